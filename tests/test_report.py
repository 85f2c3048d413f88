"""report.md / report.html from a report dict: the summary in words (heads, roles, routes, winners, restoration),
real tables, empty groups told apart from zeros, a reason for every step with nothing to show, and definitions that
point at existing methods pages. Hand-made report dicts: no model runs here (the browser test renders a real one)."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pytest

from arbiter.report import DEFINITIONS, html_page, markdown, write

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _report() -> dict:
    """A small, consistent diagnosis: 2 layers x 2 heads; head (1, 0) is TopG, a vision expert that reads the image."""
    entries = []
    for src, dst, nssd, present in (("image", "last", [-0.02, -0.4], True), ("context", "last", [-0.01, 0.0], True),
                                    ("image", "system", [0.0, 0.0], False), ("context", "instruction", [0.0, 0.0],
                                                                              True)):
        for c in (0, 1):
            entries.append({"src": src, "dst": dst, "center": c, "layers": [0, 1] if c == 0 else [0, 1],
                            "nssd": nssd[c], "mfr": 0.9, "pi": 0.8, "mfr_vision": 0.3 if nssd[c] < -0.1 else 1.0,
                            "mfr_text": 1.0, "edge_present": present})
    return {
        "model": {"class": "TinyVLM", "n_layers": 2, "n_heads": 2},
        "n_samples": 10,
        "mfr": {"vision": 0.8, "text": 0.4, "overall": 0.6},
        "mfr_pi": {"vision": 0.9, "text": 0.5, "overall": 0.7},
        "mfr_source": "generation",
        "mam": {"vision": [-0.5, 1.0], "text": [0.2, -0.3]},
        "mam_instruction": {"vision": [0.0, 0.1], "text": [0.0, -0.1]},
        "mam_components": {},
        "ldar": [0.55, 0.75],
        "knockout": entries,
        "knockout_window": 3,
        "heads": {"method": "exhaustive",
                  "ranking": [{"layer": 1, "head": 0, "score": 0.9}, {"layer": 0, "head": 1, "score": 0.3},
                              {"layer": 0, "head": 0, "score": 0.1}, {"layer": 1, "head": 1, "score": -0.2}],
                  "agreement": [{"method": "dla", "spearman": 0.4, "spearman_abs_reference": 0.5,
                                 "topg_overlap": 0.0, "top3_overlap": 0.33, "reference_split_half": None}],
                  "scores": {"exhaustive": {"vision": [[0.1, -0.1], [1.5, -0.2]],
                                            "text": [[0.1, 0.7], [0.3, -0.2]]}}},
        "blocking": {"heads": [[1, 0]], "n_samples": 6, "mfr_base": 1.0, "mfr_top": 0.5, "mfr_random": [0.9, 1.0],
                     "relative_drop_top": 0.5, "relative_drop_random_mean": 0.05, "relative_drop_random_sd": 0.07},
        "amplification": {"alpha": [2.0, 3.0], "restored": [0.25, 0.5], "restored_random_mean": [0.0, 0.25],
                          "restored_random_sd": [0.0, 0.1], "n_failed": 4, "heads": [[1, 0]], "restored_base": 0.0},
        "imbalance": {"layers": [0, 1], "modalities": ["image", "context"], "query": "last", "how": "log_ratio",
                      "heat": [[0.1, -1.0], [2.0, 0.0]], "mass_1": [[0.1, 0.0], [0.6, 0.2]],
                      "mass_2": [[0.1, 0.5], [0.05, 0.2]], "norm_1": [[1.0, 1.0], [1.0, 1.0]], "norm_2": [[1.0, 1.0], [1.0, 1.0]],
                      "per_token": False, "scalar": 0.775, "per_layer_mean": [-0.45, 1.0], "share_m1_larger": 0.5},
        "shapley": {"skipped": "no conflict sample has an image"},
        "attractors": {"skipped": "the data file declares no label set"},
        "timing_s": {"baseline": 1.25, "knockout": 2.5},
        "settings": {"data": "data.jsonl"},
    }


def _summary(md: str) -> str:
    return md.split("## What was found", 1)[1].split("\n## ", 1)[0]


def test_summary_names_the_topg_heads_with_the_role_the_rule_gives():
    md = markdown(_report())
    # head (1, 0): s_v = 1.5 > 0 and 1.5 >= 2 * max(0.3, 0) -> vision expert; it reads the image (log ratio 2.0)
    assert "**L1H0**, vision expert; of image and context, it reads the image: attention mass 0.600 vs 0.050" \
        in _summary(md)


def test_summary_says_which_modality_wins_under_each_instruction():
    s = _summary(markdown(_report()))
    assert "follows the image in 80% of samples (the **image wins**)" in s
    assert "follows the text in 40% of samples (the **image wins**)" in s   # MFR 0.4 < 0.5: the text loses


def test_summary_says_where_the_image_enters_and_the_blocking_effect():
    s = _summary(markdown(_report()))
    assert "The image enters the last token around layers 0–1" in s and "−0.400" in s
    assert "(vision-instructed MFR 0.30 instead of 0.90)" in s
    assert "The text context → last token: cutting it changes little" in s
    assert "takes MFR from 1.00 to 0.50 (relative drop 0.50; random heads of the same number: drop 0.05 ± 0.07)" in s


def test_summary_reports_the_restored_fraction_next_to_its_random_control():
    s = _summary(markdown(_report()))
    assert "of 4 failures, scaling the arbitration heads by α = 3 restores 50%" in s
    assert "random heads of the same number restore 25% ± 10%" in s


def test_summary_says_there_was_nothing_to_restore_without_failures():
    rep = _report()
    rep["amplification"] = {"alpha": [2.0], "restored": [], "restored_random_mean": [], "restored_random_sd": [],
                            "n_failed": 0, "heads": [[1, 0]]}
    md = markdown(rep)
    assert "nothing to restore" in _summary(md)
    assert "> Amplification: no failures to restore" in md


def test_tables_are_markdown_tables_and_html_tables():
    rep = _report()
    md, page = markdown(rep), html_page(rep)
    assert "| instruction | MFR (generation) | MFR (π > 0.5) |\n|---|---|---|\n" in md
    assert "| trust the image (vision-instructed) | 0.800 | 0.900 |" in md
    assert "<pre" not in page
    assert page.count("<table>") == len(re.findall(r"^\|---\|", md, re.M)) >= 6
    assert "<td class=\"num\">0.800</td>" in page


def test_knockout_table_tells_empty_groups_from_measured_zeros():
    md = markdown(_report())
    assert "| image → system | —/empty | —/empty |" in md                 # no system tokens: nothing was cut
    assert "| context → instruction | 0.000 | 0.000 |" in md             # cut, no change


def test_mfr_section_states_both_and_neither_counts_when_present():
    rep = _report()
    assert "**both**" not in markdown(rep)
    rep["mfr"]["answers"] = {"both": 3, "neither": 2, "n": 10,
                             "by_target": {"vision": {"both": 1, "neither": 2, "n": 4},
                                           "text": {"both": 2, "neither": 0, "n": 6}}}
    md = markdown(rep)
    assert ("mention **both** modalities' answers: 3; **neither**: 2 of 10 (vision-instructed: both 1, neither 2 of "
            "4; text-instructed: both 2, neither 0 of 6)") in md
    assert "3 generations mention both answers, 2 neither" in _summary(md)


def test_every_skipped_step_says_why():
    md = markdown(_report())
    assert "> Modality Shapley: skipped (no conflict sample has an image)." in md
    assert "> Label perturbation: skipped (the data file declares no label set)." in md
    assert "> No image-attention figures (this report has no image-attention section" in md


def test_image_attention_figures_are_embedded_with_their_captions(tmp_path):
    from PIL import Image

    (tmp_path / "ia").mkdir()
    Image.new("RGB", (4, 3), "red").save(tmp_path / "ia" / "s0_L1H0.png")
    rep = _report()
    rep["image_attention"] = [{"path": "ia/s0_L1H0.png", "caption": "where head L1H0 looks on s0.", "sample": "s0",
                               "head": "L1H0"},
                              {"path": "ia/missing.png", "caption": "gone.", "sample": "s0", "head": "last"}]
    page = html_page(rep, tmp_path, drawn={})
    import base64

    data = base64.b64encode((tmp_path / "ia" / "s0_L1H0.png").read_bytes()).decode()
    assert f'alt="image attention of head L1H0 on sample s0" src="data:image/png;base64,{data}"' in page
    assert "where head L1H0 looks on s0.</figcaption>" in page
    assert "figure file ia/missing.png is missing from the report folder." in page
    md = markdown(rep)
    assert "![image attention of head L1H0 on sample s0](ia/s0_L1H0.png)" in md


def test_every_figure_has_a_numbered_caption_and_every_internal_link_a_target():
    page = html_page(_report())
    figures = re.findall(r"<figure id=\"([^\"]+)\">(.*?)</figure>", page, re.S)
    assert figures and all("<figcaption><b>Figure " in body for _, body in figures)
    ids = set(re.findall(r' id="([^"]+)"', page))
    targets = set(re.findall(r'href="#([^"]+)"', page))
    assert targets and targets <= ids


def test_definitions_link_to_methods_pages_that_exist(tmp_path):
    page = html_page(_report(), tmp_path)
    for key, (_, doc_page, _) in DEFINITIONS.items():
        assert (DOCS / "methods" / doc_page).is_file(), doc_page
        assert f'id="def-{key}"' in page
    links = re.findall(r'href="([^"#][^"]*\.md)"', page)
    assert links and all((tmp_path / link).resolve().is_file() for link in links)


def test_report_names_no_unnamed_paper_and_no_internal_document():
    rep = _report()
    rep["keyspace"] = {"modalities": ["image", "text"], "keys": "pre_rope", "layers": [0, 1],
                       "summary": {"mmd_mean": 0.3, "intra_mean": 0.01, "mmd_max": 0.4, "layer_max": 1, "ratio": 30.0,
                                   "jsd_mean": 0.2}}
    md = markdown(rep)
    assert "Paper:" not in md and "SPEC" not in md
    assert "Unveiling Intrinsic Text Bias in MLLMs through Attention Key-Space Analysis, arXiv:2510.26721" in md


def test_conflict_steps_skipped_are_said_so():
    rep = copy.deepcopy(_report())
    why = {"skipped": "no conflict sample"}
    rep.update(n_samples=0, mfr=why, mfr_pi=why, heads=why, blocking=why, amplification=why, knockout=[], ldar=[])
    md = markdown(rep)
    assert "conflict steps (baseline, knockout map, head rankings, blocking, amplification) were skipped: " \
           "no conflict sample." in md


def test_methods_index_links_every_methods_page():
    index = (DOCS / "methods.md").read_text()
    pages = sorted(p.name for p in (DOCS / "methods").glob("*.md"))
    linked = sorted(set(re.findall(r"\]\(methods/([a-z0-9-]+\.md)\)", index)))
    assert linked == pages


@pytest.mark.parametrize("page", sorted(p.name for p in (DOCS / "methods").glob("*.md")))
def test_each_methods_page_links_back_to_the_index(page):
    assert "[Methods index](../methods.md)" in (DOCS / "methods" / page).read_text()


def test_knockout_table_of_a_deep_model_has_one_row_per_centre_layer():
    rep = _report()
    rep["knockout"] = [{"src": "image", "dst": "last", "center": c, "layers": [c], "nssd": -c / 100, "mfr": 1.0,
                        "edge_present": True} for c in range(12)]
    md = markdown(rep)
    assert "| centre layer | image → last |" in md and "| 11 | −0.110 |" in md


@pytest.mark.slow
def test_written_report_carries_its_methods_pages_and_links_them_after_a_move(tmp_path):
    write(_report(), tmp_path / "run")
    shutil.move(tmp_path / "run", tmp_path / "moved")
    page = (tmp_path / "moved" / "report.html").read_text()
    links = sorted(set(re.findall(r'href="([^"#][^"]*\.md)"', page)))
    assert links == sorted({f"methods/{p}" for _, p, _ in DEFINITIONS.values()})
    for link in links:
        assert (tmp_path / "moved" / link).read_text() == (DOCS / link).read_text()


def test_no_user_facing_string_cites_the_internal_specification():
    """Users do not have the project's internal SPEC; strings (errors, readings, help, docstrings) name docs/ pages."""
    import io
    import tokenize

    found = []
    for path in sorted((DOCS.parent / "arbiter").rglob("*.py")):
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type == tokenize.STRING and re.search(r"\bSPEC\b", tok.string):
                found.append(f"{path.name}:{tok.start[0]}")
    assert found == []


def test_amplification_table_starts_from_the_unscaled_floor():
    rep = _report()
    rep["amplification"]["restored_base"] = 0.25
    md = markdown(rep)
    assert "| 1 (unscaled) | 0.250 | 0.250 |\n| 2 | 0.250 | 0.000 ± 0.000 |" in md
    assert "25% of the failures already have π > 0.5 with no scaling (row α = 1)" in md
