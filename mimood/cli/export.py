"""`mimood-export`."""
from mimood.cli._common import not_implemented

main = not_implemented("mimood-export")
