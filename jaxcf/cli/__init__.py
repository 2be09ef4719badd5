"""The command-line programs (python -m jaxcf.<command>): thin mains."""
