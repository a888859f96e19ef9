"""The instance metadata document (`/metadata/instance`), as Azure's IMDS defines it. Pure: no I/O.

What in-guest HA and monitoring agents read about their own machine: its name, its id, where it
runs (location, zone), which update domain its host is maintained in. Only `compute` is served;
each api-version sees the fields it defines. A sub-path walks into the document
(`/metadata/instance/compute/name`): an object is answered in JSON, a leaf only with
`format=text`, as IMDS does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Oldest first, as IMDS names them.
API_VERSIONS: tuple[str, ...] = (
    "2017-03-01",
    "2017-04-02",
    "2017-08-01",
    "2017-10-01",
    "2017-12-01",
    "2018-02-01",
    "2018-04-02",
    "2018-10-01",
    "2019-02-01",
    "2019-03-11",
    "2019-04-30",
    "2019-06-01",
    "2019-06-04",
    "2019-08-01",
    "2019-08-15",
    "2019-11-01",
    "2020-06-01",
    "2020-07-15",
    "2020-09-01",
    "2020-10-01",
    "2020-12-01",
    "2021-01-01",
    "2021-02-01",
    "2021-03-01",
    "2021-05-01",
    "2021-10-01",
    "2021-11-01",
    "2021-11-15",
    "2021-12-13",
    "2023-07-01",
    "2023-11-15",
)
NEWEST_VERSIONS = list(reversed(API_VERSIONS[-3:]))
BASE_FIELDS = ("location", "name", "platformFaultDomain", "platformUpdateDomain", "vmId")
ADDED_FIELDS: dict[str, tuple[str, ...]] = {"2017-12-01": ("zone",), "2019-03-11": ("resourceId",)}
# Host labels that say where a host is.
LOCATION_LABEL, ZONE_LABEL, FAULT_DOMAIN_LABEL = "location", "zone", "fault-domain"

ERROR_LEAF_JSON = {
    "error": "Bad request. Query parameter format=json is not supported for leaf nodes; "
    "use format=text"
}
ERROR_NODE_TEXT = {
    "error": "Bad request. Query parameter format=text is supported for leaf nodes only; "
    "use format=json"
}
ERROR_BAD_FORMAT = {"error": "Bad request. Query parameter format must be json or text"}
ERROR_NOT_FOUND = {"error": "Not found"}


@dataclass(frozen=True)
class Instance:
    """What maintctl knows of one guest and its host."""

    name: str
    uuid: str
    host: str
    update_domain: int
    labels: dict[str, str]


def fields_of(version: str) -> tuple[str, ...]:
    index = API_VERSIONS.index(version)
    extra = [f for v in API_VERSIONS[: index + 1] for f in ADDED_FIELDS.get(v, ())]
    return tuple(sorted(BASE_FIELDS + tuple(extra)))


def document(instance: Instance, version: str) -> dict[str, Any]:
    """{"compute": {...}} with the fields `version` defines; IMDS writes numbers as strings."""
    labels = instance.labels
    every = {
        "location": labels.get(LOCATION_LABEL, ""),
        "name": instance.name,
        "platformFaultDomain": labels.get(FAULT_DOMAIN_LABEL, "0"),
        "platformUpdateDomain": str(instance.update_domain),
        "resourceId": f"/hosts/{instance.host}/virtualMachines/{instance.name}",
        "vmId": instance.uuid,
        "zone": labels.get(ZONE_LABEL, ""),
    }
    return {"compute": {k: every[k] for k in fields_of(version)}}


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str


def _json(status: int, value: Any) -> Answer:
    return Answer(status, json.dumps(value, separators=(",", ":")).encode(), "application/json")


def answer(doc: dict[str, Any], path: list[str], fmt: str | None) -> Answer:
    """The node at `path` inside `doc` in the asked format (json unless said; text for leaves)."""
    if fmt not in (None, "json", "text"):
        return _json(400, ERROR_BAD_FORMAT)
    node: Any = doc
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return _json(404, ERROR_NOT_FOUND)
        node = node[part]
    if isinstance(node, dict):
        return _json(400, ERROR_NODE_TEXT) if fmt == "text" else _json(200, node)
    if fmt != "text":
        return _json(400, ERROR_LEAF_JSON)
    return Answer(200, str(node).encode(), "text/plain; charset=utf-8")
