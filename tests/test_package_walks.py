"""The package docstring's walks (a THR write, a virtio-blk read) name files and the functions in
them in the order they are reached: each row must still point at something that exists."""

import pathlib
import re

import pykvm

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROW = re.compile(r"^ {4}((?:pykvm|csrc)/\S+)\s+([A-Za-z_][\w.]*)")


def _rows():
    return [ROW.match(line).groups() for line in pykvm.__doc__.splitlines() if ROW.match(line)]


def test_the_walks_name_files_and_functions_that_exist():
    rows = _rows()
    assert len(rows) >= 15, rows            # both walks found
    missing = []
    for path, name in rows:
        text = (ROOT / path).read_text() if (ROOT / path).is_file() else None
        if text is None:
            missing.append(path)
            continue
        for part in name.split("."):
            # a Python class/def, or a C function or struct of that name
            if not re.search(rf"(?:\bdef|\bclass) {part}\b|\b{part}\(|\bstruct {part}\b", text):
                missing.append(f"{path}: {part}")
    assert not missing, missing
