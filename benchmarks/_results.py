"""Writes a benchmark's results: a Markdown table and the raw figures as JSON."""

import json
import os

from qat_plugin.files import write_bytes_atomic


def write_results(folder, stem, markdown, figures):
    """Writes `<stem>.md` and `<stem>.json` into `folder`, atomically.

    Example:

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> write_results(folder, "demo", "| a |", {"a": 1})
    >>> sorted(os.listdir(folder))
    ['demo.json', 'demo.md']
    """
    os.makedirs(folder, exist_ok=True)
    text = markdown if markdown.endswith("\n") else markdown + "\n"
    write_bytes_atomic(os.path.join(folder, f"{stem}.md"), text.encode())
    write_bytes_atomic(
        os.path.join(folder, f"{stem}.json"), json.dumps(figures, indent=2).encode()
    )
