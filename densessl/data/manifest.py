"""Per-image provenance (PASS-style): an attribution manifest, licence terms and filters.

A manifest is a CSV file with a header, or JSON (a list of objects, or ``{"images": [...]}``),
with one row per image: ``file`` (relative to the data root), ``licence`` (an SPDX id such as
``CC-BY-4.0`` or a name such as ``CC BY-NC 4.0``; ``license`` is accepted too), ``author``,
``url``, and any number of boolean flags (``contains_people``, ``contains_personal_data``, ...).

:func:`select_images` applies a recipe's ``data.provenance`` filters to a source's images and
returns what is kept plus a JSON summary (licence counts, drops and their reasons, the
inherited terms of use); :func:`inherited_terms` states the most restrictive terms a model
trained on a set of licences inherits.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from densessl.errors import DataError

FIELDS = ("file", "licence", "author", "url")
REQUIRABLE = ("licence", "author", "url")
ATTRIBUTION_COLUMNS = ("file", "licence", "author", "url")
_TRUE = {"true", "yes", "1", "y", "t"}
_FALSE = {"false", "no", "0", "n", "f", ""}
UNKNOWN = "unknown"


@dataclass
class ManifestRow:
    file: str
    licence: str = ""
    author: str = ""
    url: str = ""
    flags: dict[str, bool] = field(default_factory=dict)
    row: int = 0  # line of a CSV file / index of a JSON list, for messages

    def attribution(self, flag_names: Sequence[str]) -> dict:
        return {"file": self.file, "licence": self.licence, "author": self.author,
                "url": self.url, **{f: self.flags.get(f, False) for f in flag_names}}


@dataclass
class Manifest:
    path: Path
    sha256: str
    rows: dict[str, ManifestRow]
    flag_names: list[str]


# ------------------------------------------------------------------ licences


def canonical_licence(licence: str | None) -> str:
    """An SPDX-like id for a licence string (``CC BY-NC-SA 4.0`` → ``CC-BY-NC-SA-4.0``); the
    stripped input when it is not a licence this module knows; ``unknown`` when empty."""
    text = (licence or "").strip()
    if not text or text.lower() in ("unknown", "none", "noassertion", "n/a", "?"):
        return UNKNOWN
    norm = re.sub(r"[\s_]+", "-", text.upper()).replace("CC-0", "CC0")
    norm = re.sub(r"^CREATIVE-COMMONS-", "CC-", norm)
    if norm in ("PUBLIC-DOMAIN", "PD", "CC-PDDC", "PUBLIC-DOMAIN-MARK") or norm.startswith(
            "PDDL"):
        return "public-domain" if not norm.startswith("PDDL") else "PDDL-1.0"
    m = re.fullmatch(r"CC0(?:-(\d\.\d))?", norm)
    if m:
        return f"CC0-{m[1] or '1.0'}"
    m = re.fullmatch(r"CC-BY((?:-(?:NC|SA|ND))*)(?:-(\d\.\d))?", norm)
    if m:
        parts = m[1].split("-")[1:]
        order = [p for p in ("NC", "ND", "SA") if p in parts]
        return "-".join(["CC-BY", *order, *([m[2]] if m[2] else [])])
    known = {"MIT": "MIT", "APACHE-2.0": "Apache-2.0", "BSD-2-CLAUSE": "BSD-2-Clause",
             "BSD-3-CLAUSE": "BSD-3-Clause", "ODBL-1.0": "ODbL-1.0", "ODC-BY-1.0": "ODC-By-1.0",
             "CDLA-PERMISSIVE-1.0": "CDLA-Permissive-1.0",
             "CDLA-PERMISSIVE-2.0": "CDLA-Permissive-2.0",
             "CDLA-SHARING-1.0": "CDLA-Sharing-1.0"}
    return known.get(norm, text)


def licence_terms(licence: str | None) -> dict:
    """What a licence asks of a model trained on the image: ``known`` (this module recognises
    it), ``commercial`` (commercial use allowed), ``sharealike``, ``no_derivatives``,
    ``attribution``. Unrecognised licences are ``known: False`` and ``commercial: None``."""
    lic = canonical_licence(licence)
    terms = {"licence": lic, "known": True, "commercial": True, "sharealike": False,
             "no_derivatives": False, "attribution": False}
    if lic in ("public-domain", "PDDL-1.0") or lic.startswith("CC0"):
        return terms
    if lic.startswith("CC-BY"):
        parts = lic.split("-")
        return {**terms, "commercial": "NC" not in parts, "sharealike": "SA" in parts,
                "no_derivatives": "ND" in parts, "attribution": True}
    if lic in ("MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "ODC-By-1.0",
               "CDLA-Permissive-1.0", "CDLA-Permissive-2.0"):
        return {**terms, "attribution": lic != "CDLA-Permissive-2.0"}
    if lic in ("ODbL-1.0", "CDLA-Sharing-1.0"):
        return {**terms, "sharealike": True, "attribution": True}
    return {**terms, "known": False, "commercial": None}


def inherited_terms(licence_counts: dict[str, int]) -> dict:
    """The most restrictive terms a model trained on images under ``licence_counts``
    (licence → image count) inherits: any NC licence makes it non-commercial; ShareAlike and
    NoDerivatives are noted; an unknown licence leaves commercial use unknown and is warned
    about. ``statement`` is one human sentence for the model card."""
    nc, sa, nd, attr, unknown = Counter(), Counter(), Counter(), Counter(), Counter()
    for licence, count in licence_counts.items():
        t = licence_terms(licence)
        if not t["known"]:
            unknown[t["licence"]] += count
            continue
        for bucket, flag in ((nc, not t["commercial"]), (sa, t["sharealike"]),
                             (nd, t["no_derivatives"]), (attr, t["attribution"])):
            if flag:
                bucket[t["licence"]] += count
    commercial = False if nc else (None if unknown else True)
    parts = []
    if nc:
        parts.append(f"NON-COMMERCIAL use only: {sum(nc.values())} images are under "
                     f"{', '.join(sorted(nc))}")
    elif unknown:
        parts.append("commercial use UNKNOWN: some images have an unknown licence")
    else:
        parts.append("commercial use allowed by every image licence")
    if sa:
        parts.append(f"ShareAlike: {sum(sa.values())} images under {', '.join(sorted(sa))} "
                     "(derived works may have to be shared under the same terms)")
    if nd:
        parts.append(f"NoDerivatives: {sum(nd.values())} images under {', '.join(sorted(nd))} "
                     "(whether a trained model is a derivative is for your lawyer)")
    if attr:
        parts.append(f"attribution required for {sum(attr.values())} images (see the "
                     "attribution file)")
    warnings = []
    if unknown:
        warnings.append(f"{sum(unknown.values())} images have an unknown or unrecognised "
                        f"licence ({', '.join(sorted(unknown)[:5])}): the terms of use of this "
                        "model are not known")
    return {"commercial_use": commercial, "non_commercial_images": sum(nc.values()),
            "sharealike_images": sum(sa.values()), "no_derivatives_images": sum(nd.values()),
            "attribution_images": sum(attr.values()), "unknown_licence_images":
            sum(unknown.values()), "statement": "; ".join(parts), "warnings": warnings}


# ------------------------------------------------------------------ reading


def _bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DataError(f"{where}: expected true/false/yes/no/1/0 or empty, got {value!r}")


def _relative(file, where: str) -> str:
    if not isinstance(file, str) or not file.strip():
        raise DataError(f"{where}, column file: expected a path relative to the data root, got "
                        f"{file!r}")
    p = PurePosixPath(file.strip().replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts:
        raise DataError(f"{where}, column file: {file!r} must be relative to the data root "
                        "(no leading / and no ..)")
    return str(p)


def _row(entry: dict, where: str, flag_names: list[str]) -> ManifestRow:
    values = {k.strip().lower() if isinstance(k, str) else k: v for k, v in entry.items()}
    if "license" in values and "licence" not in values:
        values["licence"] = values.pop("license")
    if "file" not in values:
        raise DataError(f"{where}: no 'file' column/key (expected file, licence, author, url "
                        "and optional boolean flags)")
    row = ManifestRow(file=_relative(values["file"], where))
    for key in ("licence", "author", "url"):
        v = values.get(key)
        if v is not None and not isinstance(v, (str, int, float)):
            raise DataError(f"{where}, column {key}: expected text, got {v!r}")
        setattr(row, key, "" if v is None else str(v).strip())
    for key, v in values.items():
        if key in FIELDS or key == "license":
            continue
        row.flags[key] = _bool(v, f"{where} (file {row.file}), column {key}")
        if key not in flag_names:
            flag_names.append(key)
    return row


def read_manifest(path: str | Path) -> Manifest:
    """Read a CSV (with a header) or JSON manifest; any malformed row is one DataError line
    naming the file, the row and the column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.manifest: {str(path)!r} not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"manifest {path}: not UTF-8 text ({exc})") from None
    rows: dict[str, ManifestRow] = {}
    flag_names: list[str] = []
    entries: list[tuple[str, dict]] = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"manifest {path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and "images" in data:
            data = data["images"]
        if not isinstance(data, list):
            raise DataError(f"manifest {path}: expected a list of image objects (or "
                            f"{{\"images\": [...]}}), got {type(data).__name__}")
        for i, entry in enumerate(data):
            where = f"manifest {path}: entry {i}"
            if not isinstance(entry, dict):
                raise DataError(f"{where}: expected an object with file, licence, author, url, "
                                f"got {type(entry).__name__}")
            entries.append((where, entry))
    else:
        reader = csv.DictReader(io.StringIO(text))
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        if "file" not in header:
            raise DataError(f"manifest {path}: the first line must be a header with a 'file' "
                            f"column (and licence, author, url, flags), got {header}")
        for entry in reader:
            if not any((v or "").strip() for v in entry.values() if isinstance(v, str)):
                continue  # blank line
            where = f"manifest {path}: row {reader.line_num}"
            if None in entry:
                raise DataError(f"{where}: more values than header columns")
            entries.append((where, entry))
    for where, entry in entries:
        row = _row(entry, where, flag_names)
        row.row = int(re.findall(r"\d+$", where)[0])
        if row.file in rows:
            raise DataError(f"{where}: file {row.file!r} is listed twice (first at row/entry "
                            f"{rows[row.file].row})")
        rows[row.file] = row
    if not rows:
        raise DataError(f"manifest {path}: no rows")
    return Manifest(path, hashlib.sha256(raw).hexdigest(), rows, flag_names)


# ------------------------------------------------------------------ filtering


def select_images(files: Sequence[str], manifest: Manifest | None, *,
                  require: Iterable[str] = (), allow_licences: Iterable[str] | None = None,
                  exclude_flags: Iterable[str] = (), on_missing: str = "drop",
                  cards: Sequence[dict] = ()) -> tuple[list[int], dict, list[dict]]:
    """Apply provenance filters to a source's images (``files``: paths relative to its root).

    Each image is dropped for the first reason that applies, in this order: no manifest row
    (when ``require`` or ``allow_licences`` is set), a required field empty
    (``missing_<field>``), a licence outside ``allow_licences`` (``licence_not_allowed``), an
    excluded flag set (``flag_<name>``). ``on_missing: error`` refuses images without the
    required provenance instead of dropping them.

    Returns (indices kept, summary for metrics.json / encoder.json / checkpoints, attribution
    rows of the kept images). Without a manifest every image counts as licence ``unknown``
    unless the source's dataset cards (``cards``) give one licence for all of it.
    """
    require = list(require)
    allow = None if allow_licences is None else {canonical_licence(x) for x in allow_licences}
    exclude = list(exclude_flags)
    bad = [r for r in require if r not in REQUIRABLE]
    if bad:
        raise DataError(f"data.provenance.require: unknown field {bad[0]!r}; expected some of "
                        f"{list(REQUIRABLE)}")
    rows = manifest.rows if manifest is not None else {}
    flag_names = manifest.flag_names if manifest is not None else []
    unknown_flags = [f for f in exclude if manifest is not None and f not in flag_names]
    card_licence = None
    card_licences = {c.get("licence") or c.get("license") for c in cards}
    if len(card_licences) == 1:
        card_licence = next(iter(card_licences))
    keep: list[int] = []
    dropped: Counter = Counter()
    licences: Counter = Counter()
    flagged: Counter = Counter()
    missing_examples: list[str] = []
    without = 0
    attribution = []
    for i, file in enumerate(files):
        row = rows.get(file)
        reason = None
        if row is None:
            if require or allow is not None:
                reason = "no_manifest_row"
        else:
            empty = [r for r in require if not getattr(row, r)]
            if empty:
                reason = f"missing_{empty[0]}"
            elif allow is not None and canonical_licence(row.licence) not in allow:
                reason = "licence_not_allowed"
            else:
                hit = [f for f in exclude if row.flags.get(f)]
                reason = f"flag_{hit[0]}" if hit else None
        if reason is not None and (reason == "no_manifest_row" or reason.startswith("missing_")):
            if on_missing == "error":
                missing_examples.append(file)
                continue
        if reason is not None:
            dropped[reason] += 1
            continue
        keep.append(i)
        if row is None:
            without += 1
            licences[canonical_licence(card_licence) if card_licence else UNKNOWN] += 1
            attribution.append({"file": file, "licence": card_licence or "", "author": "",
                                "url": "", **{f: False for f in flag_names}})
        else:
            licences[canonical_licence(row.licence)] += 1
            flagged.update(f for f, v in row.flags.items() if v)
            attribution.append(row.attribution(flag_names))
    if missing_examples:
        raise DataError(f"data.provenance: {len(missing_examples)} images lack "
                        f"{' / '.join(require) or 'a manifest row'} (e.g. {missing_examples[0]!r}"
                        f"{' in ' + str(manifest.path) if manifest else ''}) and "
                        "data.provenance.on_missing is error; add them to the manifest or set "
                        "on_missing: drop")
    terms = inherited_terms(dict(licences))
    warnings = list(terms["warnings"])
    in_source = set(files)
    unmatched = [f for f in rows if f not in in_source]
    if manifest is not None and unmatched:
        warnings.append(f"{len(unmatched)} manifest rows name files the source does not have "
                        f"(e.g. {unmatched[0]!r}); is the manifest relative to data.path?")
    if unknown_flags:
        warnings.append(f"data.provenance.exclude_flags {unknown_flags} are not columns of "
                        f"{manifest.path}; they exclude nothing")
    summary = {
        "manifest": str(manifest.path) if manifest is not None else None,
        "manifest_sha256": manifest.sha256 if manifest is not None else None,
        "filters": {"require": require, "allow_licences": sorted(allow) if allow else allow,
                    "exclude_flags": exclude, "on_missing": on_missing},
        "images_total": len(files), "images_used": len(keep),
        "images_dropped": sum(dropped.values()), "dropped": dict(sorted(dropped.items())),
        "licences": dict(licences.most_common()),
        "without_provenance": without,
        "flagged": dict(sorted(flagged.items())),
        "manifest_rows_unmatched": len(unmatched),
        "terms": {k: v for k, v in terms.items() if k != "warnings"},
        "warnings": warnings,
        "attribution_sha256": hashlib.sha256(attribution_csv(attribution).encode()).hexdigest(),
    }
    return keep, summary, attribution


def attribution_csv(rows: Sequence[dict]) -> str:
    """The per-image attribution file (CC-BY asks for it): file, licence, author, url, flags."""
    buf = io.StringIO()
    columns = list(ATTRIBUTION_COLUMNS) + [k for k in (rows[0] if rows else {})
                                           if k not in ATTRIBUTION_COLUMNS]
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (str(v).lower() if isinstance(v, bool) else v)
                         for k, v in row.items()})
    return buf.getvalue()


def manifest_report(root: str | Path, manifest_path: str | Path,
                    files: Sequence[str] | None = None) -> dict:
    """``densessl data inspect --manifest``: licence counts, images without provenance and
    flagged images for the images under ``root`` (``files``: relative paths; default every
    image file under ``root``)."""
    from densessl.data.image_folder import list_images

    root = Path(root)
    manifest = read_manifest(manifest_path)
    if files is None:
        files = [str(p.relative_to(root).as_posix()) for p in list_images(root)]
    _, summary, rows = select_images(files, manifest)
    no_row = [f for f in files if f not in manifest.rows]
    no_licence = [f for f in files if f in manifest.rows and not manifest.rows[f].licence]
    flagged = {flag: [r["file"] for r in rows if r.get(flag)] for flag in manifest.flag_names}
    return {"manifest": str(manifest.path), "manifest_sha256": manifest.sha256,
            "images": len(files), "licences": summary["licences"],
            "terms": summary["terms"],
            "without_provenance": {"count": len(no_row) + len(no_licence),
                                   "no_manifest_row": no_row[:50],
                                   "no_licence": no_licence[:50]},
            "flagged": {f: {"count": len(v), "files": v[:50]} for f, v in flagged.items()},
            "manifest_rows_unmatched": summary["manifest_rows_unmatched"],
            "warnings": summary["warnings"]}


def find_image_provenance(builder) -> tuple[dict | None, list[dict]]:
    """The provenance summary and attribution rows a filtered source carries (attributes
    ``image_provenance`` / ``attribution``), found through the builder's wrapped datasets."""
    seen: set[int] = set()
    stack = [builder]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        summary = getattr(obj, "image_provenance", None)
        if summary is not None:
            return summary, list(getattr(obj, "attribution", None) or [])
        for name in ("dataset", "datasets", "source", "base", "builder"):
            child = getattr(obj, name, None)
            stack.extend(child if isinstance(child, (list, tuple)) else [child])
    return None, []


def apply_provenance(dataset, source: str, root: str | Path | None, manifest: str | Path | None,
                     *, require: Iterable[str] = (), allow_licences: Iterable[str] | None = None,
                     exclude_flags: Iterable[str] = (), on_missing: str = "drop",
                     warn=None):
    """Filter a source dataset in place by its manifest and attach the summary
    (``dataset.image_provenance``) and attribution rows (``dataset.attribution``).

    The source must list its images (``provenance_files()``, relative to ``root``) and keep a
    subset (``restrict(indices)``); a source that does not is refused when a manifest is
    given. Without a manifest such a source still gets a summary (its licences are then
    unknown, and said so). Unknown licences are passed to ``warn`` (default: warnings.warn)."""
    import warnings as _warnings

    listed = callable(getattr(dataset, "provenance_files", None)) and callable(
        getattr(dataset, "restrict", None))
    if not listed:
        if manifest:
            raise DataError(f"data.manifest: data source {source!r} does not list its image "
                            "files, so a manifest cannot be matched to it; manifests work with "
                            "sources that do (e.g. folder)")
        return dataset
    parsed = read_manifest(manifest) if manifest else None
    files = dataset.provenance_files()
    keep, summary, rows = select_images(
        files, parsed, require=require, allow_licences=allow_licences,
        exclude_flags=exclude_flags, on_missing=on_missing,
        cards=getattr(dataset, "dataset_cards", None) or [])
    if not keep:
        raise DataError(f"data.provenance: every image of {str(root)!r} was dropped "
                        f"({summary['dropped']}); check the manifest "
                        f"{str(manifest)!r} and data.provenance")
    if len(keep) < len(files):
        dataset.restrict(keep)
    dataset.image_provenance, dataset.attribution = summary, rows
    for message in summary["warnings"]:
        (warn or (lambda m: _warnings.warn(m, UserWarning, stacklevel=3)))(
            f"data provenance: {message}")
    return dataset
