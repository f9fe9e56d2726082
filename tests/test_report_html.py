"""report.html, the flip explorer (issue 22, item 2): written next to report.md, self-contained, record text
escaped, and working in a real headless Chromium driven by selenium (Debian's chromium + chromium-driver).

The browser tests skip only when Chromium (or selenium) is missing outside CI; in CI (the CI variable, or run under
.ci/run, whose scripts/setup.sh installs them) they fail instead."""
from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from evalhost.errors import UserError
from evalhost.report import write_report

INJECT = ('<script>window.__pwned = 1</script><img src="https://evil.example/x.png" '
          'onerror="window.__pwned = 2"></script><b>bold</b>')


def rec(key, cond, item, text, tokens, label, *, task="jail", backend="vllm-a", dispatcher="prompt_list", group="g1",
        position=0, peers=(), top=None):
    r = {"key": key, "condition": cond, "repeat": 0, "model": "m", "backend": backend, "task": task,
         "item_id": item, "domain": "safety", "dispatcher": "solo" if cond == "solo" else dispatcher,
         "batch_size": 1 if cond == "solo" else 4, "output_token_ids": tokens, "output_text": text,
         "output_sha256": None, "label": label, "score": {"comply": 0.0, "refuse": 1.0}.get(label),
         "finish_reason": "stop", "prompt_sha256": f"p-{item}", "cell": f"{backend}-{dispatcher}-{cond}",
         "group_id": group if cond == "batch" else f"solo-{item}", "position": position if cond == "batch" else 0,
         "peers": list(peers) if cond == "batch" else [], "scorer": "refusal"}
    if top is not None:
        r["top_logprobs"] = top
    return r


def records():
    out = []
    # 1: substantive flip (refuse -> comply), near-tie at token 1, task "jail", vllm-a, prompt_list
    out += [rec("s1", "solo", "i1", "I cannot help with that.", [10, 11, 12], "refuse",
                top=[[[10, -0.01], [9, -5.0]], [[11, -0.60], [13, -0.65]], [[12, -0.1], [2, -3.0]]]),
            rec("b1", "batch", "i1", "I can help with that.", [10, 13, 12], "comply", peers=["i2", "i3", "i4"])]
    # 2: parse-failure flip (refuse -> unparsed, empty batch output)
    out += [rec("s2", "solo", "i2", "No.", [20], "refuse", top=[[[20, -0.2], [21, -2.0]]]),
            rec("b2", "batch", "i2", "", [], "unparsed", position=1, peers=["i1", "i3", "i4"])]
    # 3: text change only, hostile text on both sides, other task and dispatcher
    out += [rec("s3", "solo", "<i3>", "Safe " + INJECT, [30, 31], "comply", task="<b>mcq</b>",
                top=[[[30, -0.1], [31, -3.0]], [[31, -0.2], [32, -1.2]]]),
            rec("b3", "batch", "<i3>", "Safe! " + INJECT, [30, 32], "comply", task="<b>mcq</b>",
                dispatcher="synchronized", group="g2")]
    # 4: text change only on another backend, without top-k (margin unknown)
    out += [rec("s4", "solo", "i4", "Paris is the capital.", [40, 41], "comply", backend="hf-b"),
            rec("b4", "batch", "i4", "Paris is a capital.", [40, 42], "comply", backend="hf-b")]
    # 5: substantive flip on hf-b (comply -> refuse)
    out += [rec("s5", "solo", "i5", "Sure, here it is.", [50], "comply", backend="hf-b"),
            rec("b5", "batch", "i5", "Sorry, I can't.", [51], "refuse", backend="hf-b")]
    # 6: unchanged (no row)
    out += [rec("s6", "solo", "i6", "Same.", [60], "comply"), rec("b6", "batch", "i6", "Same.", [60], "comply")]
    for r in out:
        import hashlib

        r["output_sha256"] = hashlib.sha256(r["output_text"].encode()).hexdigest()
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    write_report(d, plots=False)
    return d


def _outside_data(page: str) -> str:
    return re.sub(r'(<script type="application/json" id="flip-data">).*?(</script>)', r"\1\2", page, flags=re.S)


def test_written_next_to_report_md_and_self_contained(run_dir):
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert (run_dir / "report.md").is_file()
    assert page.startswith("<!DOCTYPE html>")
    # no network: no URL, no src/href, no CSS url()/@import outside the data block; the CSP forbids requests
    shell = _outside_data(page)
    for bad in ("http:", "https:", "src=", "href=", "url(", "@import", "//cdn"):
        assert bad not in shell, bad
    csp = html.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', shell).group(1))
    assert "default-src 'none'" in csp and "connect-src 'none'" in csp and "script-src 'sha256-" in csp
    # record text cannot leave the JSON block: exactly two script elements, one closing tag each
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "\\u003cscript\\u003e" in page  # the hostile output is there, escaped
    # headline rows rendered server-side are escaped too (a task named <b>mcq</b>)
    assert "&lt;b&gt;mcq&lt;/b&gt;" in shell and "<b>mcq</b>" not in shell


def test_explorer_rows_carry_texts_margins_and_groups(run_dir):
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    blob = re.search(r'<script type="application/json" id="flip-data">(.*?)</script>', page, re.S).group(1)
    data = json.loads(blob)
    rows = {r["key"]: r for r in data["rows"]}
    assert set(rows) == {"b1", "b2", "b3", "b4", "b5"}
    assert [rows[k]["kind"] for k in ("b1", "b2", "b3", "b4", "b5")] == \
        ["substantive", "parse_failure", "text_change", "text_change", "substantive"]
    r1 = rows["b1"]
    assert (r1["solo_text"], r1["batch_text"]) == ("I cannot help with that.", "I can help with that.")
    assert r1["margin"] == pytest.approx(0.05) and r1["margin_class"] == "tie" and r1["batch_rank"] == 2
    assert r1["peers"] == ["i2", "i3", "i4"] and r1["position"] == 0 and r1["group_id"] == "g1"
    assert rows["b4"]["margin"] is None and rows["b4"]["margin_reason"] == "no_top_logprobs"
    assert data["threshold"] == 0.125


def test_a_large_run_shows_a_capped_explorer_substantive_flips_first(tmp_path, monkeypatch):
    """A run with more changes than the explorer shows: the page keeps the substantive flips, then parse failures,
    then text changes, says how many it left out, and summary.json keeps the margin aggregates without one row per
    change (issue 18: report memory bounded on a 1,000,000-record run)."""
    import evalhost.report_html as rh

    monkeypatch.setattr(rh, "EXPLORER_MAX_ROWS", 3)
    d = tmp_path / "run"
    d.mkdir()
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    write_report(d, plots=False)
    page = (d / "report.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json" id="flip-data">(.*?)</script>', page, re.S).group(1))
    assert [r["key"] for r in data["rows"]] == ["b1", "b2", "b5"]  # substantive b1, b5 and parse-failure b2 kept
    assert "shows 3 of the 5 changes" in page
    summary = json.loads((d / "summary.json").read_text())
    assert "rows" not in summary["margins"] and summary["margins"]["rows_in"] == "report.html"
    assert summary["margins"]["overall"]["changes"] == 5  # the aggregates still count every text change


def test_written_atomically_through_rundir(tmp_path):
    """A link named report.html is refused (one sentence, as for report.md), never written through."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (d / "report.html").symlink_to(victim)
    with pytest.raises(UserError, match="report.html is a symbolic link"):
        write_report(d, plots=False)
    assert victim.read_text() == "keep me"
    (d / "report.html").unlink()
    write_report(d, plots=False)
    assert "flip-data" in (d / "report.html").read_text()
    assert not [p for p in d.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]  # no temp left


# -- in a real browser ------------------------------------------------------------------------------------------
def _in_ci() -> bool:
    if os.environ.get("CI"):
        return True
    pid = os.getppid()  # launched by .ci/run (possibly through pytest's parents)?
    for _ in range(32):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        if ".ci/run" in cmd:
            return True
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid <= 1:
            return False
    return False


def _need(what: str) -> None:
    message = f"{what}; scripts/setup.sh installs it (apt-get install chromium chromium-driver; pip install selenium)"
    if _in_ci():
        pytest.fail(message + " — required in CI")
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        _need("Chromium or chromedriver is not installed")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _need("selenium is not installed")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium look anything up on the network
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _visible_rows(drv) -> int:
    return drv.execute_script("return Array.from(document.querySelectorAll('tr.row')).filter(r => !r.hidden && "
                              "r.offsetParent !== null).length")


def _select(drv, name: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(drv.find_element("id", f"f-{name}")).select_by_value(value)


def test_page_renders_and_filters_change_rows(browser, run_dir):
    browser.get((run_dir / "report.html").as_uri())
    assert browser.title.startswith("Flip explorer")
    assert browser.find_element("tag name", "h1").text.startswith("Flip explorer")
    assert _visible_rows(browser) == 5
    assert browser.find_element("id", "shown").text == "5" and browser.find_element("id", "total").text == "5"
    _select(browser, "kind", "substantive")
    assert _visible_rows(browser) == 2 and browser.find_element("id", "shown").text == "2"
    _select(browser, "backend", "hf-b")
    assert _visible_rows(browser) == 1
    _select(browser, "kind", "")
    assert _visible_rows(browser) == 2
    _select(browser, "backend", "")
    _select(browser, "dispatcher", "synchronized")
    assert _visible_rows(browser) == 1
    _select(browser, "dispatcher", "")
    _select(browser, "task", "<b>mcq</b>")  # the option shows the task name as text
    assert _visible_rows(browser) == 1
    _select(browser, "task", "")
    assert _visible_rows(browser) == 5
    # nothing was fetched: the page is self-contained
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0


def test_opening_a_row_shows_both_texts_with_the_divergence(browser, run_dir):
    browser.get((run_dir / "report.html").as_uri())
    row = browser.find_element("css selector", "tr.row[data-index='0']")
    row.click()
    detail = browser.execute_script("return arguments[0].nextElementSibling", row)
    assert detail.is_displayed() and row.get_attribute("aria-expanded") == "true"
    panes = detail.find_elements("css selector", "pre.text")
    assert [p.text for p in panes] == ["I cannot help with that.", "I can help with that."]
    marks = [m.text for m in detail.find_elements("css selector", "mark.div")]
    assert marks == ["not help with that.", " help with that."]  # from the first differing character on
    facts = detail.text
    assert "refuse → comply" in facts and "0.0500 nats: tie flip" in facts and "i2, i3, i4" in facts
    assert "position 0" in facts
    row.click()
    assert not detail.is_displayed()


def test_hostile_record_text_is_shown_never_run(browser, run_dir):
    browser.get((run_dir / "report.html").as_uri())
    for row in browser.find_elements("css selector", "tr.row"):
        row.click()  # open every row: each detail is built from record text
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.execute_script("return document.querySelectorAll('img, b, script').length") == 2  # our 2 scripts
    assert browser.execute_script("return document.querySelectorAll('script[src], [onerror]').length") == 0
    texts = [p.text for p in browser.find_elements("css selector", "pre.text")]
    assert any(INJECT in t for t in texts)  # shown literally
    assert any(o.text == "<b>mcq</b>" for o in browser.find_elements("css selector", "#f-task option"))


def test_screenshot_is_not_blank(browser, run_dir, tmp_path):
    from PIL import Image

    browser.get((run_dir / "report.html").as_uri())
    browser.find_element("css selector", "tr.row[data-index='0']").click()
    png = browser.get_screenshot_as_png()
    (tmp_path / "report.png").write_bytes(png)
    img = Image.open(io.BytesIO(png)).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    assert img.size[0] > 200 and img.size[1] > 200
    assert colours is None or len(colours) > 20  # text, table borders, highlight: far from one colour
    dominant = max(colours)[0] / (img.size[0] * img.size[1]) if colours else 0
    assert dominant < 0.99
