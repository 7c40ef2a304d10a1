"""The documentation's Python examples run as written: each page's ``.. code-block:: python`` blocks, in order.

The site itself is built by ``.ci/run`` (``sphinx-build -W``), not here: too slow for the suite.
"""

import pathlib
import re
import textwrap

import jax
import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.rst") if "_build" not in path.parts)
# A directive line, a blank line, then the indented body up to the first line that is not indented.
BLOCK = re.compile(r"^\.\. code-block:: python\n\n((?:[ \t]+\S.*\n|[ \t]*\n)+)", re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line, code)`` of each python block; the code padded so that line numbers are the page's."""
    blocks = []
    for match in BLOCK.finditer(text):
        first = text.count("\n", 0, match.start(1))
        blocks.append((first, "\n" * first + textwrap.dedent(match.group(1))))
    return blocks


def test_the_pages_have_examples():
    assert "getting_started.rst" in PAGES
    assert sum(len(python_blocks((DOCS / page).read_text())) for page in PAGES) >= 10


@pytest.mark.parametrize("page", [page for page in PAGES if python_blocks((DOCS / page).read_text())])
def test_page_python_examples_run_in_order(page):
    namespace = {}
    with jax.enable_x64(False):  # the examples show float32, the default
        for _, code in python_blocks((DOCS / page).read_text()):
            exec(compile(code, f"docs/{page}", "exec"), namespace)
