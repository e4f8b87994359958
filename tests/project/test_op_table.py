"""The README's table of supported ops is the rule registry: adding a rule without its row, or
a row without its rule, fails here."""

import re

from onnx import helper

from onnx_pathcond.ops import rule_for, supported_op_types
from support import repo


def _table_rows():
    text = open(repo.path("README.md")).read()
    section = text.split("## Supported ops", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("| ---")]
    return {line.split("|")[1].strip(): set(re.findall(r"`((?:[a-z]+\.)*[A-Z][A-Za-z0-9]*)`", line))
            for line in rows[1:]}


def test_every_listed_op_has_a_rule_and_every_rule_is_listed():
    rows = _table_rows()
    barrier = rows.pop("barrier")
    listed = set().union(*rows.values())
    assert listed == set(supported_op_types())
    assert not barrier & set(supported_op_types())


def test_ops_named_as_barriers_have_no_rule():
    for op in _table_rows()["barrier"]:
        domain, _, name = op.rpartition(".")
        assert rule_for(helper.make_node(name, ["x"], ["y"], domain=domain)) is None, op
