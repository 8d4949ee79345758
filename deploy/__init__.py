"""Deployment files for the broker; `deploy.render` turns them into loopback configs for tests."""
