"""The evaluation result (``evaluation.evaluate``) as a plain-text table."""
from __future__ import annotations


def _f(v: float | None, width: int = 9, digits: int = 3) -> str:
    return f"{'-':>{width}s}" if v is None else f"{v:{width}.{digits}f}"


def _set_line(role: str, d: dict) -> str:
    where = d["layout"] + (f" {d['split']}" if d["split"] else "")
    skipped = f", {len(d['skipped'])} skipped" if d["skipped"] else ""
    return (f"{role:9s} {d['path']} ({where}: {d['volumes']} volumes, {d['with_text']} with a report/prompt, "
            f"{d['with_labels']} with labels{skipped})")


def _summary(m: dict) -> list[str]:
    lines = [f"{'metric':44s} {'generated':>9s} {'real':>9s}"]
    if "fid" in m:
        fid = m["fid"]
        lines.append(f"{'Frechet distance, CLIP3D features (' + str(fid['dim']) + '-d)':44s} {_f(fid['value'])} "
                     f"{_f(fid['real_split_half'])}  (real: split-half floor)")
    if "hist" in m:
        h = m["hist"]
        lines.append(f"{'HU Wasserstein-1 over the body (HU)':44s} {_f(h['wasserstein1_hu'], digits=2)}")
        lines.append(f"{'mean HU over the body':44s} {_f(h['mean_hu_generated'], digits=1)} "
                     f"{_f(h['mean_hu_real'], digits=1)}")
    if "clip" in m:
        g, r = m["clip"]["generated"] or {}, m["clip"]["real"] or {}
        lines.append(f"{'CLIP score (prompt-volume cosine)':44s} {_f(g.get('clip_score'))} {_f(r.get('clip_score'))}")
        for k in ("top1", "top5"):
            lines.append(f"{'text->volume recall@' + k[3:]:44s} {_f(g.get(k))} {_f(r.get(k))}")
    return lines


def _findings(f: dict) -> list[str]:
    g, r = f["generated"], f["real"]
    head = f"{'finding (detector vs report labels)':36s} {'pos':>4s} {'sens':>6s} {'spec':>6s} {'bal.acc':>7s}"
    lines = [head + " |" + head[36:] + "   (generated | real)"]
    rows_g, rows_r = ({row["label"]: row for row in (t["rows"] if t else [])} for t in (g, r))

    def cells(row: dict | None) -> str:
        if row is None:
            return f" {'-':>4s} {'-':>6s} {'-':>6s} {'-':>7s}"
        return (f" {row['positives']:4d} {_f(row['sensitivity'], 6, 2)} {_f(row['specificity'], 6, 2)} "
                f"{_f(row['balanced_accuracy'], 7, 2)}")

    for label in rows_g or rows_r:
        lines.append(f"{label:36s}{cells(rows_g.get(label))} |{cells(rows_r.get(label))}")
    def macro(t: dict | None) -> str:
        if t is None:
            return cells(None)
        a = t["macro"]
        return (f" {'':4s} {_f(a['sensitivity'], 6, 2)} {_f(a['specificity'], 6, 2)} "
                f"{_f(a['balanced_accuracy'], 7, 2)}")

    lines.append(f"{'macro average':36s}{macro(g)} |{macro(r)}")
    for role, t in (("generated", g), ("real", r)):
        lines += [f"note ({role}): {n}" for n in (t or {}).get("notes", [])]
    return lines


def format_report(result: dict) -> str:
    """Sets, summary metrics, the findings table and the skipped metrics, one block each."""
    blocks = [[_set_line("generated", result["generated"]), _set_line("real", result["real"])]]
    blocks[0] += [f"  skipped {entry}" for role in ("generated", "real") for entry in result[role]["skipped"]]
    m = result["metrics"]
    if any(k in m for k in ("fid", "hist", "clip")):
        blocks.append(_summary(m))
    if "findings" in m:
        blocks.append(_findings(m["findings"]))
    if result["skipped_metrics"]:
        blocks.append([f"skipped {k}: {why}" for k, why in result["skipped_metrics"].items()])
    return "\n\n".join("\n".join(b) for b in blocks)
