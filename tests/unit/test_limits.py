"""The pure parts of request screening: JSON depth without recursion, NUL locations."""

import json

import pytest

from api.limits import MAX_JSON_DEPTH, _nul_in, json_too_deep


@pytest.mark.parametrize(
    ("body", "deep"),
    [
        (b"{}", False),
        (json.dumps({"a": {"b": [[1, {"c": "d"}]]}}).encode(), False),
        (b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, False),
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), True),
        (b"[" * 1_000_000, True),
        (json.dumps(["[" * 100, "{" * 100]).encode(), False),  # brackets inside strings
        (json.dumps(['\\"[[[[[[[[[[[[[[[[[[[[', '"']).encode(), False),  # escaped quotes
        (b"[]" * 10_000, False),  # wide is fine
    ],
)
def test_json_too_deep_counts_only_brackets_outside_strings(body, deep):
    assert json_too_deep(body) is deep


@pytest.mark.parametrize(
    ("document", "where"),
    [
        ({"a": "b", "c": [1, None, True, 2.5]}, None),
        ("\x00", ""),
        ({"hosts": ["h1", "h\x002"]}, "hosts.1"),
        ({"params": {"k\x00": "v"}}, "params.k\\x00 (a key)"),
        ([{"x": [{"y": "z\x00"}]}], "0.x.0.y"),
    ],
)
def test_nul_in_names_the_place(document, where):
    assert _nul_in(document, "") == where
