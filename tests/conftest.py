from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the checkout; never copied in


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared reference data (Llama 3 tokenizer, WikiText-103 test documents); skips the test if absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared reference data not found at {SHARED} (it lives beside the checkout, not in it)")
    return SHARED
