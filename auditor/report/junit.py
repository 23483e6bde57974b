"""JUnit XML for CI systems (Jenkins, GitLab, GitHub test reporters).

One ``<testsuite>`` per gate document, one ``<testcase>`` per requirement;
a failed requirement carries ``<failure message="...">`` with its numbers, a
requirement whose evidence could not be produced carries ``<error>``. The
layout follows the Ant / Jenkins JUnit schema (``tests/junit.xsd``). Times are
written as 0 so that the XML, like the JSON, is deterministic.
"""
from __future__ import annotations

import json
from typing import Any
from xml.sax.saxutils import escape, quoteattr

# XML 1.0 forbids most control characters even when escaped.
_BAD = {c: None for c in range(32) if c not in (9, 10, 13)}


def _text(s: Any) -> str:
    return escape(str(s).translate(_BAD))


def _attr(s: Any) -> str:
    return quoteattr(str(s).translate(_BAD))


def render(doc: dict[str, Any]) -> str:
    """JUnit XML text of a gate document (testsuites > testsuite > testcase)."""
    if doc.get("kind") != "gate":
        raise ValueError(f"JUnit output renders gate results, not {doc.get('kind')!r}")
    reqs = doc.get("requirements", [])
    pol = doc.get("policy", {})
    name = f"wmaudit gate: {pol.get('name', 'policy')}"
    failures = sum(r["status"] == "fail" for r in reqs)
    errors = sum(r["status"] == "error" for r in reqs)
    model = doc.get("model", {})
    props = [("model.path", model.get("path", "")), ("model.sha256", model.get("sha256", "")),
             ("key_commitment", doc.get("key_commitment", "")),
             ("evidence", (doc.get("evidence") or {}).get("kind", "")), ("policy.path", pol.get("path", "")),
             ("policy.sha256", pol.get("sha256", "")),
             ("tool", f"{doc.get('tool', {}).get('name', 'wmaudit')} {doc.get('tool', {}).get('version', '')}"),
             ("command", doc.get("command", "")), ("verdict", doc.get("verdict", ""))]
    props += hardware_properties(doc.get("hardware") or {})
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<testsuites name={_attr(name)} tests="{len(reqs)}" failures="{failures}" errors="{errors}" time="0">',
           f'  <testsuite name={_attr(name)} tests="{len(reqs)}" failures="{failures}" errors="{errors}" '
           f'skipped="0" time="0">',
           "    <properties>"]
    out += [f"      <property name={_attr(k)} value={_attr(v)}/>" for k, v in props]
    out.append("    </properties>")
    for r in reqs:
        classname = "wmaudit.gate." + str(r.get("attack", "")).replace("/", ".")
        head = f"    <testcase classname={_attr(classname)} name={_attr(r['id'])} time=\"0\""
        if r["status"] == "pass":
            out.append(head + ">")
            out.append(f"      <system-out>{_text(_details(r))}</system-out>")
            out.append("    </testcase>")
            continue
        tag = "failure" if r["status"] == "fail" else "error"
        typ = "threshold" if tag == "failure" else "evidence-unavailable"
        out.append(head + ">")
        out.append(f"      <{tag} message={_attr(r.get('message', ''))} type={_attr(typ)}>"
                   f"{_text(_details(r))}</{tag}>")
        out.append("    </testcase>")
    out += ["  </testsuite>", "</testsuites>", ""]
    return "\n".join(out)


def _details(r: dict[str, Any]) -> str:
    """The requirement's measured numbers and thresholds, one per line."""
    lines = [f"requirement: {r['id']}", f"status: {r['status']}"]
    if r.get("backend"):
        lines.append(f"backend: {r['backend']}")
    for k, v in sorted((r.get("measured") or {}).items()):
        lines.append(f"measured.{k}: {json.dumps(v)}")
    for k, v in sorted((r.get("thresholds") or {}).items()):
        lines.append(f"threshold.{k}: {json.dumps(v)}")
    for why in r.get("reasons", []):
        lines.append(f"reason: {why}")
    return "\n".join(lines)


def hardware_properties(hw: dict[str, Any]) -> list[tuple[str, str]]:
    """hardware.<target>.* properties: where each target's requirements were measured."""
    per = hw.get("targets") or {hw.get("target", "native"): hw}
    out = []
    for t, rec in per.items():
        cpu = rec.get("cpu") or {}
        ort = rec.get("onnxruntime") or {}
        feats = ",".join(f for f, v in (cpu.get("features") or {}).items() if v)
        em = rec.get("emulated") or {}
        gpu = rec.get("gpu") or {}
        for k, v in (("cpu", cpu.get("model") or cpu.get("arch")), ("microarchitecture", cpu.get("microarchitecture")),
                     ("level", cpu.get("level")), ("features", feats), ("onnxruntime", ort.get("version")),
                     ("execution_provider", ort.get("execution_provider")),
                     ("intra_op_threads", ort.get("intra_op_threads")),
                     ("emulated", f"{em.get('emulator')} {em.get('version')} -cpu {em.get('cpu')}" if em else "no"),
                     ("gpu", gpu.get("device")), ("driver", gpu.get("driver")), ("cuda", gpu.get("cuda_runtime")),
                     ("cudnn", gpu.get("cudnn")), ("tensorrt", gpu.get("tensorrt"))):
            if v is not None:
                out.append((f"hardware.{t}.{k}", str(v)))
    return out
