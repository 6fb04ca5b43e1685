"""The management API (DRF) under /mgmt/v1/."""
