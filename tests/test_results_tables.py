"""The tables the experiment and benchmark scripts print are the tables the docs show (issue #26).

Each script's table function is fed the figures the docs quote (what its results.json held) and
every line it prints must appear verbatim in the doc; where a table's rows need more than the doc
gives (per-case lists), its header and alignment lines must.
"""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = (REPO / "docs/results.md").read_text().splitlines()
PERFORMANCE = (REPO / "docs/performance.md").read_text().splitlines()


def assert_shown(printed: str, doc_lines: list[str]) -> None:
    missing = [line for line in printed.splitlines() if line.strip() and line not in doc_lines]
    assert not missing, "printed but not in the doc:\n" + "\n".join(missing)


def test_downstream_table_is_the_one_in_results():
    from downstream import table

    rows = [{"condition": "real only", "training_volumes": 8, "dice_mean": 0.086, "dice_std": 0.024,
             "dice_per_seed": [0.119, 0.077, 0.063], "found_mean": {"lung": 0.51, "hepatic": 0.0},
             "found_per_seed": {"lung": [0.72, 0.48, 0.34], "hepatic": [0.0, 0.0, 0.0]}},
            {"condition": "real + synthetic", "training_volumes": 24, "dice_mean": 0.065, "dice_std": 0.013,
             "dice_per_seed": [0.068, 0.048, 0.081], "found_mean": {"lung": 0.48, "hepatic": 0.0},
             "found_per_seed": {"lung": [0.33, 0.63, 0.47], "hepatic": [0.0, 0.0, 0.0]}}]
    assert_shown(table({"rows": rows}), RESULTS)


def test_flow_quality_table_is_the_one_in_results():
    from flow_quality import table

    def row(name, fid, distance, shares, step=None):
        r = {"name": name, "fid": fid, "tissue_distance": distance,
             "tissue_shares": dict(zip(("air", "lung", "fat", "soft tissue", "bone", "other"),
                                       (s / 100 for s in shares)))}
        return r if step is None else {**r, "step": step}

    rows = [row("reference phantoms", None, 0.0, (60.5, 6.6, 13.9, 16.4, 2.4, 0.1)),
            row("floor: 16 training phantoms", 21, 0.017, (61.9, 6.2, 14.3, 15.3, 2.3, 0.1)),
            row("floor: the VAE's reconstructions of the reference set", 4289, 0.105, (61.0, 5.4, 6.0, 23.2, 1.0, 3.3)),
            row("RF-30 samples, experiment 1", 8083, 0.152, (50.7, 12.1, 15.7, 12.6, 0.8, 8.1), 500),
            row("RF-30 samples, continued", 5155, 0.067, (60.8, 6.2, 9.3, 18.7, 0.9, 4.2), 900)]
    assert_shown(table({"rows": rows}), RESULTS)


def test_contrastive_tables_have_the_columns_in_results():
    from contrastive import table

    row = {"variant": "no contrastive loss", "tumors": 20, "median_abs_contrast_error_hu": 127,
           "mean_detected_fraction": 0.02, "mean_case_dice": 0.026, "fid": 5937.5}
    lung = {"variant": "no contrastive loss", "tumors": 13, "median_contrast_hu": 80, "per_tumor": [],
            "paired_change_inside_hu": [715.0] + [4547 / 6] * 6 + [826.0],  # mean 761
            "paired_change_ring_hu": [434.0] + [2836 / 6] * 6 + [578.0],  # mean 481
            "mean_detected_fraction": 0.03, "mean_case_dice": 0.036}
    printed = table({"rows": [row], "segmenter_on_real_phantoms": {"mean_detected_fraction": 0.09,
                                                                   "mean_case_dice": 0.106},
                     "lung_implants": [lung]}).splitlines()
    tables = [line for line in printed if line.startswith("| ")]
    headers_and_rules = [line for k, line in enumerate(tables) if line.startswith("| ---")
                         or (k + 1 < len(tables) and tables[k + 1].startswith("| ---"))]
    assert len(headers_and_rules) == 4
    assert_shown("\n".join(headers_and_rules), RESULTS)
    assert_shown("\n".join(line for line in printed if "no contrastive loss" in line or "themselves" in line), RESULTS)


def test_x0_training_table_has_the_columns_in_results():
    from x0_training import table

    results = {"t_ddpm": [50, 200, 400, 600, 800, 950], "t_rflow_same_noise": [232, 442, 644, 818, 939, 981],
               "rows": [{"objective": "rflow", "step": 0, "sample_std_ratio": None,
                         "relative_x0_error": [0.330, 0.630, 0.917, 1.166, 1.338, 1.398]}]}
    assert_shown(table(results), RESULTS)


def test_size_cost_table_is_the_one_in_performance():
    spec = importlib.util.spec_from_file_location("size_cost", REPO / "benchmarks/size_cost.py")
    size_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(size_cost)

    def measured(size, total, cpu, gib):
        return {"model": "bundled", "size": size, "total_s": total, "cpu_s": cpu, "peak_mib": gib * 1024,
                "estimated": False}

    def estimated(size, total, cpu, gib, median, decode):
        return {"model": "released", "size": size, "total_s": total, "cpu_s": cpu, "peak_mib": gib * 1024,
                "estimated": True, "steps_run": 5, "step_median_s": median, "decode_s": decode}

    rows = [measured(64, 4.3, 5.5, 0.59), estimated(64, 7.5, 20.1, 2.08, 0.14, 2.7),  # in the order it runs them
            measured(128, 8.3, 12.8, 1.04), estimated(128, 35.1, 78.3, 2.50, 0.39, 22.4),
            measured(256, 49.7, 80.3, 4.04), estimated(256, 510.7, 958.5, 13.2, 9.53, 217.5)]
    printed = size_cost.table(rows)
    assert_shown(printed, PERFORMANCE)
    first = PERFORMANCE.index(printed.splitlines()[0])
    assert PERFORMANCE[first:first + len(rows) + 2] == printed.splitlines()  # same rows, same order


def test_x0_error_table_is_the_one_in_results_section_5():
    from x0_error import table_head, table_row

    printed = "\n".join([table_head([50, 200, 400, 600, 800, 950]),
                         table_row("l1", "rflow", 2000, [0.060, 0.228, 0.437, 0.666, 0.924, 1.127]),
                         table_row("l2", "rflow", 2000, [0.059, 0.226, 0.442, 0.680, 0.941, 1.142])])
    first = RESULTS.index(printed.splitlines()[0])
    assert RESULTS[first:first + 4] == printed.splitlines()
