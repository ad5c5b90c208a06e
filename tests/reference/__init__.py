"""Reference implementations that exist only to check the package."""
