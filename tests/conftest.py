"""Suite-wide pytest plugins (each is a module under tests/)."""

pytest_plugins = ["tests.leakcheck", "tests.api_usage", "tests.fixtures.s3", "tests.fixtures.models"]
