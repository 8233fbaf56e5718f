"""The run report as one self-contained HTML file (no script, no network: a
Content-Security-Policy allows only inline styles and data: images and audio).

Every string that comes from the archive or the workdir (URIs, messages, texts,
paths) goes through :func:`esc`: control and formatting characters are shown
escaped, then the text is HTML-escaped, quotes included, so it is inert in
element text and in attribute values alike.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable
from typing import Any

from xmodal_index.sinks.workdir import Workdir

from .report import JOB_CONFIG_NAME, ReportData
from .report_plots import (
    COLORS,
    FAIL,
    counts_plot,
    phases_plot,
    throughput_plot,
)

CSP = "default-src 'none'; img-src data:; media-src data:; style-src 'unsafe-inline'"
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
color:#222;margin:0;background:#f4f5f7}
main{max-width:1100px;margin:0 auto;padding:20px 28px 40px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:0 0 10px}
section{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:14px 18px;margin:14px 0}
.meta{color:#555;font-size:13px}.meta code{font-size:12px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:top}
th{color:#555;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-size:12px;font-weight:600;color:#fff}
.ok{background:#2e7d32}.bad{background:#c62828}.warn{background:#ef6c00}.muted{background:#78909c}
.grid{display:flex;flex-wrap:wrap;gap:16px}.grid>div{flex:1 1 300px}.grid>div.wide{flex:2 1 420px}
.tiles{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:8px}
.tile{background:#f0f2f5;border-radius:6px;padding:6px 12px;min-width:84px}
.tile .v{font-size:20px;font-weight:600;font-variant-numeric:tabular-nums}.tile .k{font-size:11px;color:#555}
.tile.failed .v{color:#c62828}
.grid>div>section{margin:0;height:100%;box-sizing:border-box}img.plot{width:100%;max-width:640px;height:auto}
pre{background:#f0f2f5;padding:8px 10px;border-radius:6px;white-space:pre-wrap;word-break:break-all;font-size:12px}
.hits{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0 14px}
.hit{width:140px;border:1px solid #dde1e6;border-radius:6px;padding:6px;font-size:12px;background:#fafbfc}
.hit img{display:block;width:100%;height:104px;object-fit:contain;background:#222;border-radius:4px}
.hit audio{width:100%;height:32px;margin-top:4px}.uri{word-break:break-all;color:#333}
.msg{color:#444;font-size:12px;word-break:break-word}.q{font-weight:600}
"""


def esc(value: Any) -> str:
    """Printable (control/format characters as \\xNN, \\uNNNN) and HTML-escaped, quotes included."""
    text = str(value)
    if not text.isprintable():
        text = "".join(
            c
            if c.isprintable()
            else (
                f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
            )
            for c in text
        )
    return html.escape(text, quote=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _badge(ok: bool | None, yes: str, no: str) -> str:
    cls = "muted" if ok is None else "ok" if ok else "bad"
    return f'<span class="badge {cls}">{esc(yes if ok or ok is None else no)}</span>'


def _rows(pairs: Iterable[tuple[str, Any]], numeric: bool = False) -> str:
    cell = '<td class="n">' if numeric else "<td>"
    return "".join(f"<tr><th>{esc(k)}</th>{cell}{esc(v)}</td></tr>" for k, v in pairs)


def _plot(uri: str, alt: str) -> str:
    return f'<img class="plot" alt="{esc(alt)}" src="{esc(uri)}">'


def _header(d: ReportData) -> str:
    s = d.summary
    code = s.get("exit_code")
    status = _badge(
        code == 0 if isinstance(code, int) else None, "completed" if code == 0 else "no summary", f"exit code {code}"
    )
    started = s.get("started_at") or "?"
    wall = float(s.get("wall_s") or 0)
    error = f'<p class="msg"><b>error:</b> {esc(s["error"])}</p>' if s.get("error") else ""
    return (
        f"<header><h1>xmodal-index run <code>{esc(d.run_id)}</code> {status}</h1>"
        f'<div class="meta">started {esc(started)} &middot; {wall:.1f} s wall'
        f" &middot; source <code>{esc(s.get('source', '?'))}</code> &middot; workdir <code>{esc(d.workdir)}</code>"
        f"<br>model <code>{esc(s.get('model_id') or '?')}</code> &middot; generated "
        f"{esc(datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC'))}</div>{error}</header>"
    )


def _counts(d: ReportData) -> str:
    s = d.summary
    holds, text = d.invariant
    keys = ("inputs_total", "indexed", "unchanged", "failed", "deleted", "skipped_by_range", "segments", "rows_written")
    covered = _badge(
        d.dead_letters_cover_failures,
        "every failed input has a dead letter",
        f"only {d.dead_letter_uris} of {s.get('failed')} failed inputs have a dead letter",
    )
    tiles = "".join(
        f'<div class="tile{" failed" if k == "failed" and s.get(k) else ""}"><div class="v">{esc(s.get(k, "?"))}'
        f'</div><div class="k">{esc(k)}</div></div>'
        for k in keys
    )
    return (
        f"<section><h2>Counts</h2><div class='tiles'>{tiles}</div>"
        f"<p>{_badge(holds, 'invariant holds', 'invariant broken')}"
        f" <code>{esc(text)}</code> &nbsp; {covered}</p></section>"
    )


def _timing(d: ReportData) -> str:
    parts = []
    series = d.throughput()
    start = d.dag_start()
    if series and start is not None:
        done, failed = d.timeline.cumulative(start, True), d.timeline.cumulative(start, False)
        parts.append(f"<div>{_plot(throughput_plot(series, done, failed), 'throughput over time')}</div>")
    if d.phases:
        parts.append(
            f"<div>{_plot(phases_plot([(p.name, p.start_s, p.seconds) for p in d.phases]), 'run phases')}</div>"
        )
    by_kind = {k: (t.items, t.media_s, t.decode_s) for k, t in d.timeline.kinds.items()}
    table = "".join(
        f"<tr><td>{esc(k)}</td><td class='n'>{n}</td><td class='n'>{m:.1f}</td><td class='n'>{t:.2f}</td>"
        f"<td class='n'>{(m / t if t > 0 and m > 0 else 0):.1f}</td></tr>"
        for k, (n, m, t) in sorted(by_kind.items())
    )
    if table:
        table = (
            "<table><tr><th>kind</th><th>items</th><th>media s</th><th>decoder s</th>"
            f"<th>media s per decoder s</th></tr>{table}</table>"
        )
    elif not parts:
        table = "<p>No timing recorded (the run processed no items).</p>"
    return f"<section><h2>Throughput and timing</h2><div class='grid'>{''.join(parts)}</div>{table}</section>"


def _failures(d: ReportData) -> str:
    s = d.summary
    if not s.get("failed") and not d.failures:
        return "<section><h2>Failures</h2><p>None.</p></section>"
    by_stage: dict[str, int] = {}
    for g in d.failures:
        by_stage[g.stage] = by_stage.get(g.stage, 0) + g.count
    groups = []
    for g in d.failures:
        examples = "".join(
            f'<li><span class="uri">{esc(uri)}</span><br><span class="msg">{esc(msg[:400])}</span></li>'
            for uri, msg in g.examples
        )
        groups.append(
            f"<tr><td>{esc(g.stage)}</td><td>{esc(g.error_type)}</td><td class='n'>{g.count}</td>"
            f"<td><ul>{examples}</ul></td></tr>"
        )
    side = (
        "<div>"
        + "".join(
            f"<table><tr><th>{esc(title)}</th><th>failed</th></tr>"
            + "".join(f"<tr><td>{esc(k)}</td><td class='n'>{v}</td></tr>" for k, v in counts.items())
            + "</table>"
            for title, counts in (
                ("container (extension)", d.failures_by_container),
                ("codec (named by the decoder)", d.failures_by_codec),
            )
        )
        + "</div>"
    )
    plot = _plot(counts_plot(by_stage, "failed items", color_by_name=False, color=FAIL), "failures by stage")
    retry = ""
    if d.retry_command:
        retry = f"<p>Retry the failed inputs once they are fixed:</p><pre>{esc(d.retry_command)}</pre>"
        if d.workdir.startswith("s3://"):
            retry += (
                f"<p class='meta'>with <code>{esc(JOB_CONFIG_NAME)}</code> copied here from "
                f"<code>{esc(Workdir(d.workdir).run_dir(d.run_id))}/{esc(JOB_CONFIG_NAME)}</code></p>"
            )
    return (
        f"<section><h2>Failures</h2><div class='grid'><div class='wide'>{plot}</div>{side}</div>"
        "<table><tr><th>stage</th><th>error class</th><th>count</th><th>first inputs</th></tr>"
        f"{''.join(groups)}</table>"
        f"{retry}</section>"
    )


def _segments(d: ReportData) -> str:
    v = d.version
    parts = []
    if d.segments_by_modality:
        plot = counts_plot(d.segments_by_modality, "rows written by this run")
        parts.append(f"<div>{_plot(plot, 'segments per modality')}</div>")
    if v is not None and v.ntotal_by_modality:
        rows = "".join(
            f"<tr><td><span style='color:{COLORS.get(m, '#333')}'>&#9632;</span> {esc(m)}</td>"
            f"<td class='n'>{esc(d.segments_by_modality.get(m, 0))}</td><td class='n'>{esc(n)}</td></tr>"
            for m, n in sorted(v.ntotal_by_modality.items())
        )
        parts.append(
            f"<div><table><tr><th>modality</th><th>this run</th><th>in {esc(v.version)}</th></tr>{rows}</table></div>"
        )
    body = "".join(parts) or "<p>No segments written.</p>"
    return f"<section><h2>Segments per modality</h2><div class='grid'>{body}</div></section>"


def _kinds(by_kind: dict[str, Any]) -> list[tuple[str, Any]]:
    """float first, then binary, then anything else by name."""
    return sorted(by_kind.items(), key=lambda kv: ({"float": 0, "binary": 1}.get(kv[0], 2), kv[0]))


def _version(d: ReportData) -> str:
    s, v = d.summary, d.version
    gate = s.get("gate") or ""
    note = s.get("index_note") or ""
    if v is None:
        return f"<section><h2>Index version</h2><p>{esc(note or 'no version')}</p></section>"
    recall = ", ".join(
        f"{k} {val:.3f}" if isinstance(val, (int, float)) else f"{k} ?" for k, val in _kinds(v.recall_at_10)
    )
    factory = ", ".join(f"{k} {val}" for k, val in _kinds(v.index_factory))
    rows = _rows(
        [
            ("version", v.version),
            ("parent", v.parent_version or "-"),
            ("recall@10", recall or "not measured"),
            ("index factory", factory),
            ("vectors", v.ntotal),
            ("size", human_bytes(v.bytes_total)),
            ("created", v.created_at),
            ("gate", gate or "-"),
            ("outcome", note or "-"),
        ]
    )
    return (
        f"<section><h2>Index version {esc(v.version)} {_badge(v.published, 'published', 'not published')}</h2>"
        f"<table>{rows}</table></section>"
    )


def _hit(h: Any) -> str:
    media = f'<img alt="{esc(h.modality)} at {h.start_s:.2f} s" src="{esc(h.thumbnail)}">' if h.thumbnail else ""
    if h.audio:
        media += f'<audio controls preload="none" src="{esc(h.audio)}"></audio>'
    text = f'<div class="msg">&ldquo;{esc(h.text[:160])}&rdquo;</div>' if h.text else ""
    name = h.uri.rsplit("/", 1)[-1]
    color = COLORS.get(h.modality, "#333")
    return (
        f'<div class="hit">{media}<div><b style="color:{color}">{esc(h.modality)}</b> '
        f"{h.start_s:.2f}&ndash;{h.end_s:.2f} s</div><div>score {h.score:.3f}</div>"
        f'<div class="uri" title="{esc(h.uri)}">{esc(name)}</div>{text}</div>'
    )


def _samples(d: ReportData) -> str:
    if not d.samples:
        return f"<section><h2>Sample queries</h2><p>{esc(d.samples_note or 'none')}</p></section>"
    blocks = "".join(
        f'<p class="q">&ldquo;{esc(r.query)}&rdquo; <span class="meta">in {esc(", ".join(r.searched))}</span></p>'
        f'<div class="hits">{"".join(_hit(h) for h in r.hits)}</div>'
        for r in d.samples
    )
    intro = (
        f"<p class='meta'>Text rows of {esc(d.version.version if d.version else '?')} used as queries "
        "(the first distinct ones by segment id), searched in each of the other modalities (the best hits of each).</p>"
    )
    return f"<section><h2>Sample queries</h2>{intro}{blocks}</section>"


def _notes(d: ReportData) -> str:
    if not d.notes:
        return ""
    return "<section><h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in d.notes) + "</ul></section>"


def render(d: ReportData) -> str:
    """The whole report page."""
    index = f"<div class='grid'><div>{_version(d)}</div><div>{_segments(d)}</div></div>"
    body = "".join([_header(d), _counts(d), _failures(d), index, _samples(d), _timing(d), _notes(d)])
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>xmodal-index run {esc(d.run_id)}</title><style>{STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )
