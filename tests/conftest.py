import pytest


@pytest.fixture(scope="session")
def ext():
    """The nanogpt package with its extension built or loaded once per test session."""
    import nanogpt

    nanogpt.extension()
    return nanogpt
