"""`mimood-infer`."""
from mimood.cli._common import not_implemented

main = not_implemented("mimood-infer")
