"""runtime — see README.md; built in later issues."""
