from __future__ import annotations

from apimgmt import keys


def test_generated_key_verifies() -> None:
    assert keys.is_well_formed(keys.generate_key())
