"""The evaluation report folder, and ``report.html``: one self-contained page of it.

:func:`save_report` writes the folder of ``src.evaluate``: ``metrics.json``,
``predictions.csv`` (:mod:`src.evaluation.compute`), the PNG plots
(:func:`src.evaluation.plots.make_plots`) and ``report.html``.

In ``report.html`` plots are embedded as base64 PNG (``data:`` URIs), tables are plain HTML
and the style sheet is inline: the file reads offline, by itself, in any browser (no
external CSS, JavaScript or fonts). :func:`write_report` takes the ``metrics.json`` dict
and the PNG paths of :mod:`src.evaluation.plots`.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;
line-height:1.4;padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;border-bottom:2px solid #ddd;padding-bottom:3px;margin-top:34px}
h3{font-size:1.02em;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:.88em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.meta td{text-align:left}.worst{background:#fde2e1}.note{color:#555;font-size:.85em}
.headline{font-size:1.05em;background:#f7f9fc;border-left:4px solid #4c72b0;padding:6px 10px;margin:8px 0}
.gap{color:#b00;font-weight:600}
.bar{display:inline-block;height:9px;background:#4c72b0;vertical-align:middle}
.plots{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.plots figure{margin:0}.plots img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.8em;color:#555}
details.impl{font-size:.85em;margin:4px 0 10px}details.impl summary{cursor:pointer;color:#4c72b0}
"""


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "&ndash;"
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def embed_png(path) -> str:
    """``<img>`` tag with the PNG inlined as a base64 data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def _figures(paths: Sequence[tuple[str, Optional[Path]]]) -> str:
    items = [f"<figure>{embed_png(p)}<figcaption>{html.escape(cap)}</figcaption></figure>"
             for cap, p in paths if p is not None and Path(p).is_file()]
    return f'<div class="plots">{"".join(items)}</div>' if items else ""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "", row_classes=None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if any(header) else ""
    body = []
    for i, r in enumerate(rows):
        rc = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{rc}>" + "".join(f"<td>{c if isinstance(c, str) and c.startswith('<') else _fmt(c)}</td>"
                                          for c in r) + "</tr>")
    c = f' class="{cls}"' if cls else ""
    return f"<table{c}>{head}{''.join(body)}</table>"


def _bar(v: Optional[float], width: int = 90) -> str:
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
        return ""
    return f'<span class="bar" style="width:{max(1, int(round(v * width)))}px"></span>'


def _implementations(m: Mapping) -> str:
    """The head's ``implementations`` block: which library and convention gives each number."""
    impl = m.get("implementations") or {}
    if not impl:
        return ""
    rows = "".join(f"<tr><td><code>{html.escape(str(k))}</code></td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in impl.items())
    return (f"<details class='impl'><summary>How each number is computed</summary>"
            f"<table class='meta'><tr><th>metric</th><th>implementation and convention</th></tr>{rows}</table>"
            f"</details>")


def _classification_section(key: str, m: Mapping, plots: Mapping) -> str:
    title = {"class": "Classification", "tumor": "Tumour vs no tumour", "subtype": "Tumour subtype",
             "multilabel": "Multi-label classification"}.get(key, key)
    out = [f"<h2>{html.escape(title)} <span class='note'>(head <code>{html.escape(key)}</code>, "
           f"n = {m.get('n')})</span></h2>"]
    if m.get("composed_from"):
        out.append(f"<p class='note'>Composed from the heads {html.escape(' + '.join(m['composed_from']))}: "
                   f"no_tumor when p(tumour) &lt; {_fmt(m.get('threshold'), 2)}, else the subtype argmax.</p>")
    if key == "multilabel":
        head = (f"subset accuracy <b>{_fmt(m.get('subset_accuracy'))}</b> &middot; Hamming loss "
                f"{_fmt(m.get('hamming_loss'))} &middot; macro F1 <b>{_fmt(m['macro']['f1'])}</b> &middot; "
                f"ROC-AUC (macro) {_fmt(m['roc_auc']['macro'])} &middot; class-wise ECE "
                f"{_fmt(m['calibration'].get('ece_classwise'))}")
    else:
        head = (f"accuracy <b>{_fmt(m.get('accuracy'))}</b> &middot; balanced accuracy "
                f"<b>{_fmt(m.get('balanced_accuracy'))}</b> &middot; macro F1 <b>{_fmt(m['macro']['f1'])}</b> "
                f"&middot; ROC-AUC (macro, OvR) {_fmt(m['roc_auc']['macro'])} &middot; ECE "
                f"{_fmt(m['calibration'].get('ece'))}")
    out.append(f"<div class='headline'>{head}</div>")
    worst = m.get("worst_class")
    if worst and len(m.get("per_class", {})) > 2:
        out.append(f"<p>Lowest recall: <span class='gap'>{html.escape(worst['name'])} "
                   f"{_fmt(worst['recall'])}</span> ({_fmt(worst['gap_to_macro_recall'], 3)} against the mean recall "
                   f"{_fmt(m.get('balanced_accuracy'))}); F1 {_fmt(worst['f1'])}.</p>")
    rows, rcls = [], []
    for name, pc in m.get("per_class", {}).items():
        rows.append([name, pc["precision"], pc["recall"], _bar(pc["recall"]), pc["f1"], pc["support"], pc["roc_auc"]])
        rcls.append("worst" if worst and name == worst["name"] and len(m["per_class"]) > 2 else "")
    for avg in ("macro", "micro", "weighted"):
        a = m.get(avg)
        if a:
            rows.append([f"{avg} avg", a["precision"], a["recall"], _bar(a["recall"]), a["f1"],
                         sum(pc["support"] for pc in m["per_class"].values()) if avg != "macro" else None, None])
            rcls.append("")
    out.append(_table(["class", "precision", "recall", "", "F1", "support", "ROC-AUC"], rows, row_classes=rcls))
    absent = [c for c in m.get("per_class", {}) if c not in m.get("classes_present", m.get("per_class", {}))]
    if absent:
        out.append(f"<p class='note'>No image of {html.escape(', '.join(absent))} in this split: recall, F1 and "
                   "ROC-AUC undefined (&ndash;), left out of the macro and weighted averages.</p>")
    out.append(_implementations(m))
    p = plots.get(key, {})
    out.append(_figures([("confusion matrix", p.get("confusion")), ("ROC curves", p.get("roc")),
                         ("reliability diagram", p.get("reliability"))]))
    return "\n".join(out)


def _boxes_section(m: Mapping, plots: Mapping) -> str:
    det = m.get("coco", {})
    out = ["<h2>Boxes <span class='note'>(head <code>boxes</code>)</span></h2>",
           f"<div class='headline'>COCO mAP@0.5 <b>{_fmt(m.get('map50'))}</b> &middot; COCO mAP@0.5:0.95 "
           f"<b>{_fmt(m.get('map50_95'))}</b> &middot; VOC AP@0.5 (ours) {_fmt(m.get('voc_map50'))} &middot; "
           f"slot IoU mean {_fmt(m.get('slot_iou_mean'))} (&ge; 0.5: {_fmt(m.get('slot_iou_ge_0.5'))}, &ge; 0.75: "
           f"{_fmt(m.get('slot_iou_ge_0.75'))})</div>",
           f"<p class='note'>{m.get('n_boxes')} known boxes (one per class slot). mAP: one predicted box per class "
           f"slot on each of {det.get('n_images', '?')} images with known boxes, confidence = "
           f"{html.escape(str(det.get('confidence', '')))}, against every true box of that class.</p>"]
    rows = []
    for name, pc in m.get("per_class", {}).items():
        rows.append([name, pc.get("n_slots"), pc.get("slot_iou_mean"), pc.get("n_gt"), pc.get("ap50"),
                     pc.get("ap50_95"), pc.get("voc_ap50")])
    out.append(_table(["class", "known slots", "slot IoU", "true boxes", "COCO AP@0.5", "COCO AP@0.5:0.95",
                       "VOC AP@0.5"], rows))
    out.append(_implementations(m))
    out.append(_figures([("slot IoU histogram", plots.get("boxes", {}).get("iou_hist"))]))
    return "\n".join(out)


def _mask_section(m: Mapping, plots: Mapping) -> str:
    unit = html.escape(str(m.get("hd95_unit", "px")))
    out = ["<h2>Masks <span class='note'>(head <code>mask</code>)</span></h2>",
           f"<div class='headline'>Dice <b>{_fmt(m.get('dice_mean'))}</b> (tumour images only "
           f"<b>{_fmt(m.get('dice_mean_tumor_only'))}</b>) &middot; IoU {_fmt(m.get('iou_mean'))} &middot; "
           f"HD95 {_fmt(m.get('hd95_mean'), 2)} {unit} &middot; global Dice "
           f"{_fmt(m.get('dice_global'))} &middot; COCO mask mAP@0.5 <b>{_fmt(m.get('map50'))}</b>, mAP@0.5:0.95 "
           f"{_fmt(m.get('map50_95'))}</div>"]
    rows = [["images with a known mask", m.get("n")], ["with a tumour", m.get("n_tumor")],
            ["Dice (mean, all)", m.get("dice_mean")], ["Dice (mean, tumour images)", m.get("dice_mean_tumor_only")],
            ["IoU (mean, all)", m.get("iou_mean")], ["IoU (mean, tumour images)", m.get("iou_mean_tumor_only")],
            [f"HD95 {unit} (mean where defined)", m.get("hd95_mean")], [f"HD95 {unit} (median)", m.get("hd95_median")],
            ["HD95 undefined (one mask empty)", m.get("hd95_undefined")],
            [f"HD95 {unit} (undefined = image diagonal)", m.get("hd95_mean_penalised")],
            ["empty prediction on a tumour", m.get("empty_prediction_on_tumor")],
            ["foreground predicted on a healthy slice", m.get("false_positive_on_healthy")],
            ["probability threshold", m.get("threshold")]]
    if "map50" in m:
        kind = m.get("mask_map_kind", "")
        rows += [[f"COCO mask mAP@0.5 ({kind})", m.get("map50")], [f"COCO mask mAP@0.5:0.95 ({kind})",
                                                                 m.get("map50_95")],
                 ["COCO mask mAP@0.5:0.95 (class-agnostic)", (m.get("agnostic") or {}).get("map50_95")]]
    out.append(_table(["", "value"], rows))
    out.append(_implementations(m))
    out.append(_figures([("Dice histogram", plots.get("mask", {}).get("dice_hist"))]))
    return "\n".join(out)


def _recon_section(key: str, m: Mapping) -> str:
    rows = [["PSNR dB", m["psnr"]["mean"], m["psnr"]["median"], m["psnr"]["min"], m["psnr"]["max"]],
            ["SSIM", m["ssim"]["mean"], m["ssim"]["median"], m["ssim"]["min"], m["ssim"]["max"]]]
    return (f"<h2>Reconstruction <span class='note'>(head <code>{html.escape(key)}</code>, "
            f"n = {m.get('n')})</span></h2>"
            + _table(["", "mean", "median", "min", "max"], rows) + _implementations(m))


def write_report(path, metrics: Mapping, plots: Mapping, meta: Optional[Mapping] = None,
                 files: Sequence[str] = ("metrics.json", "predictions.csv")) -> Path:
    """Write the page. ``plots``: ``{head: {kind: png}}`` plus ``"gallery": png``."""
    meta = dict(meta or {})
    heads = metrics.get("heads", metrics)
    parts = [f"<h1>Evaluation report</h1><p class='note'>{html.escape(str(meta.get('created', '')))}</p>"]
    if meta:
        parts.append(_table(["", ""], [[k, str(v)] for k, v in meta.items() if k != "created"], cls="meta"))
    for key in ("class", "tumor", "subtype", "multilabel"):
        if key in heads:
            parts.append(_classification_section(key, heads[key], plots))
    if "boxes" in heads:
        section = _boxes_section(heads["boxes"], plots)
        if heads["boxes"].get("source") == "mask":  # no box head: boxes read off the predicted masks
            how = {"largest": "its largest connected component",
                   "components": "the union of its connected components"}.get(heads["boxes"].get("mode"), "it")
            section = section.replace(
                "<h2>Boxes <span class='note'>(head <code>boxes</code>)</span></h2>",
                "<h2>Boxes (from mask) <span class='note'>(no box head: the tight box of "
                f"{html.escape(how)} in the predicted <code>mask</code>; an empty mask scores IoU 0; "
                f"{heads['boxes'].get('images_without_box', '?')} images without a box)</span></h2>", 1)
        parts.append(section)
    if "mask" in heads:
        parts.append(_mask_section(heads["mask"], plots))
    from ..heads import RECON_HEADS

    for key in RECON_HEADS:
        if key in heads:
            parts.append(_recon_section(key, heads[key]))
    if metrics.get("sources"):
        parts.append(_sources_section(metrics["sources"]))
    if plots.get("gallery"):
        parts.append("<h2>Worst and best cases</h2><p class='note'>Green: true box / mask outline; red dashed: "
                     f"predicted. Ranked by {html.escape(str(meta.get('gallery_score', 'score')))}.</p>")
        parts.append(_figures([("gallery", plots["gallery"])]))
    if metrics.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in metrics["notes"]) + "</ul>")
    links = " &middot; ".join(f"<a href='{html.escape(f)}'>{html.escape(f)}</a>" for f in files)
    parts.append(f"<p class='note'>Files beside this page: {links}</p>")
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Evaluation report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


#: the per-source table of a mix: (column, headline key)
SOURCE_COLUMNS = (("class accuracy", "class/accuracy"), ("class macro F1", "class/macro_f1"),
                  ("tumour recall (class head)", "tumor_from_class/recall_tumor"), ("tumour accuracy", "tumor/accuracy"),
                  ("Dice", "mask/dice_mean"), ("Dice (tumour slices)", "mask/dice_mean_tumor_only"),
                  ("box mAP@0.5", "boxes/map50"), ("box mAP@0.5 (class-agnostic)", "boxes_agnostic/map50"))


def _sources_section(sources: Mapping) -> str:
    """A mix: one row per source (its images of the split), the headline figures of each head."""
    from .compute import headline

    scal = {name: headline(m) for name, m in sources.items()}
    cols = [(c, k) for c, k in SOURCE_COLUMNS if any(k in v for v in scal.values())]
    rows = [[name, m.get("n_images")] + [scal[name].get(k) for _, k in cols] for name, m in sources.items()]
    return ("<h2>Per source <span class='note'>(each source's images of this split on their own; full reports "
            "in metrics.json <code>sources</code>)</span></h2>" + _table(["source", "images"] + [c for c, _ in cols], rows))


TTA_NOTE = {"none": "none", "flip": "flip (mean of the image and its horizontal mirror, spatial outputs flipped back)"}


def report_meta(doc: Mapping, gallery_score: str = "score") -> dict:
    """The table at the top of ``report.html`` from the ``metrics.json`` dict."""
    heads = ", ".join(h + (" (from mask)" if h == "boxes" and doc["boxes_from_mask"] else "")
                      for h in doc["evaluated_heads"])
    return {"created": doc["created"], "checkpoint": doc["checkpoint"], "model": doc["model"],
            "data": f"{doc['data']} ({doc['data_root']})", "split": f"{doc['split']}: {doc['n_images']} images",
            "heads": heads, "image size": doc["image_size"], "threshold": doc["threshold"],
            "test-time augmentation": TTA_NOTE[doc["tta"]], "gallery_score": gallery_score}


def save_report(out_dir, doc: Mapping, arrays: Mapping, class_map, meta: Sequence[Mapping] = (),
                gallery: int = 6) -> dict:
    """Write the report folder: ``metrics.json`` (``doc``), ``predictions.csv`` (one row per
    image of the collected ``arrays``, with ``meta``), the plots and ``report.html``;
    returns the plots (:func:`src.evaluation.plots.make_plots`)."""
    from .compute import prediction_rows, write_csv
    from .metrics import to_jsonable
    from .plots import make_plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = to_jsonable(doc)
    threshold = doc["threshold"]
    (out_dir / "metrics.json").write_text(json.dumps(plain, indent=2))
    write_csv(out_dir / "predictions.csv", prediction_rows(arrays, class_map, threshold, meta))
    plots = make_plots(arrays, doc, class_map, out_dir, threshold, gallery=gallery, meta=meta)
    write_report(out_dir / "report.html", plain, plots, meta=report_meta(doc, plots.get("gallery_score", "score")))
    return plots


__all__ = ["write_report", "embed_png", "save_report", "report_meta"]
