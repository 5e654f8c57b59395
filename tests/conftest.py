"""Every test belongs to exactly the tiers CI runs (``pytest -m unit``, then ``-m "distributed or
integration"``): a test with none of their markers would silently run in no tier."""

from __future__ import annotations

import pytest

TIERS = ("unit", "distributed", "integration")


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects the very tests this looks for
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    untiered = [item.nodeid for item in items if not any(item.get_closest_marker(t) for t in TIERS)]
    if untiered:
        listed = "\n  ".join(untiered)
        raise pytest.UsageError(
            f"{len(untiered)} test(s) carry none of the tier markers {', '.join(TIERS)}:\n  "
            f"{listed}\nAdd `pytestmark = pytest.mark.<tier>` to their module."
        )
