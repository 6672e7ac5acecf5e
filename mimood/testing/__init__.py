"""Test material that ships with the package: the seeded fuzz inputs (`mimood.testing.fuzz`)."""
