"""Load harness for the broker: `python -m bench` (`make bench`); see bench/__main__.py."""
