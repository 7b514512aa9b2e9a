"""prepare_assets.py internals: storage layout, fetching, conversion steps."""
