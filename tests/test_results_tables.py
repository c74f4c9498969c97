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


def benchmark(name: str):
    """A script of benchmarks/ as a module (the folder is not a package; its scripts import maisi2 only)."""
    spec = importlib.util.spec_from_file_location(name, REPO / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_block(printed: str, doc_lines: list[str], times: int = 1) -> None:
    """The printed lines stand together, in order, `times` times in the doc (a table, not scattered lines)."""
    lines = printed.splitlines()
    starts = [k for k, line in enumerate(doc_lines) if line == lines[0]]
    assert sum(doc_lines[k:k + len(lines)] == lines for k in starts) == times, printed


def test_size_cost_table_is_the_one_in_performance():
    size_cost = benchmark("size_cost")

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
    assert_block(printed, PERFORMANCE)  # same rows, same order


def test_size_cost_zen4_table_is_the_one_in_performance():
    size_cost = benchmark("size_cost")
    # the fields table() reads, from the rows of work/size_cost_zen4.jsonl (AMD EPYC Zen 4, 2026-12-07)
    rows = [{"model": "bundled", "size": 64, "total_s": 7.296787106000011, "cpu_s": 9.016751999999999,
             "peak_mib": 592.41796875, "estimated": False},
            {"model": "released", "size": 64, "total_s": 12.710841950999452, "cpu_s": 34.735021,
             "peak_mib": 2127.8828125, "estimated": True, "steps_run": 5, "step_median_s": 0.22753391499998088,
             "decode_s": 4.737464466000006},
            {"model": "bundled", "size": 128, "total_s": 14.835981744000037, "cpu_s": 22.729936,
             "peak_mib": 1058.9765625, "estimated": False},
            {"model": "released", "size": 128, "total_s": 76.3787289970004, "cpu_s": 168.873272,
             "peak_mib": 2682.09765625, "estimated": True, "steps_run": 5, "step_median_s": 1.0778692960000171,
             "decode_s": 41.69786257699991},
            {"model": "bundled", "size": 256, "total_s": 76.10269502799997, "cpu_s": 128.071115,
             "peak_mib": 4290.203125, "estimated": False},
            {"model": "released", "size": 256, "total_s": 1009.9622377519993, "cpu_s": 1952.804818,
             "peak_mib": 13908.6875, "estimated": True, "steps_run": 5, "step_median_s": 19.396410093999975,
             "decode_s": 419.1713736469999}]
    printed = size_cost.table(rows)
    assert_shown(printed, PERFORMANCE)
    assert_block(printed, PERFORMANCE)


def doc_tables(doc_lines: list[str]) -> list[list[str]]:
    """The Markdown tables of a doc, each as its lines."""
    tables, current = [], []
    for line in doc_lines + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def labels(table: str) -> list[str]:
    """The first cell of each row of a Markdown table (what a row is, not its figures)."""
    return [line.split(" |")[0] for line in table.splitlines()]


def _plan(unet: str, decoder: str) -> dict:
    def net(dtype):
        return {"dtype": dtype, "layout": "channels_last_3d" if dtype == "bfloat16" else "contiguous",
                "activations": "float32"}

    return {"networks": {"unet": net(unet), "controlnet": net(unet), "vae_decoder": net(decoder),
                         "vae_encoder": net("float32")}}


def test_generation_speed_e2e_table_is_the_one_in_performance():
    generation_speed = benchmark("generation_speed")

    def row(total, sampling, decode, median, cpu_sampling, cpu_decode, peak, plan=None):
        return {"total_s": total, "sampling_s": sampling, "decode_s": decode, "step_median_s": median,
                "cpu_sampling_s": cpu_sampling, "cpu_decode_s": cpu_decode, "peak_rss_mib": peak,
                "compute_plan": plan}

    # the e2e rows of work/bench/generation_speed.jsonl (AMD EPYC Zen 4, 2026-12-07) and `_compare` of
    # each of our CTs with the reference's, from the volumes saved beside them
    rows = {"reference": row(164.79420477199997, 94.93110768, 69.86309709199998, 3.1988509390000104,
                             180.072777, 129.06200900000005, 5062.87109375),
            "ours": row(76.41226624200004, 33.42754681600002, 42.98471942600003, 1.0596773449999546,
                        65.719248, 84.08565700000001, 2770.58984375, _plan("bfloat16", "float32")),
            "ours_bf16": row(55.499400570000034, 33.424184534000005, 22.07521603600003, 1.0481975589999593,
                             65.477547, 43.536018999999996, 2541.85546875, _plan("bfloat16", "bfloat16")),
            "ours_fp32": row(100.349761193, 60.85536807600005, 39.49439311699996, 2.0237812310000436,
                             120.40817500000001, 78.18047199999998, 2324.4609375, _plan("float32", "float32"))}
    agreement = {"ours": {"max_hu": 6.6728515625, "mean_hu": 0.39360952377319336},
                 "ours_bf16": {"max_hu": 119.43023681640625, "mean_hu": 6.411330223083496},
                 "ours_fp32": {"max_hu": 0.015869140625, "mean_hu": 0.0008419737569056451}}
    printed = generation_speed.e2e_table(rows, agreement)
    assert_shown(printed, PERFORMANCE)
    assert_block(printed, PERFORMANCE)
    # the AMX Xeon's and the Zen 5's tables (no stored rows) have the same header and column alignment,
    # and the Zen 5's (reference_reuse, ours before compute plans) the printed labels in the printed order
    assert_block("\n".join(printed.splitlines()[:2]), PERFORMANCE, times=3)
    zen5 = {"reference": rows["reference"], "reference_reuse": rows["reference"], "ours": row(*[1.0] * 7)}
    assert labels(generation_speed.e2e_table(zen5)) in [labels("\n".join(t)) for t in doc_tables(PERFORMANCE)]


def test_generation_speed_limit_table_is_the_one_in_performance():
    generation_speed = benchmark("generation_speed")
    # the limit row of work/bench/generation_speed.jsonl (AMD EPYC Zen 4, 2026-12-07)
    kinds = ("fp32", "fp32_cl", "bf16", "bf16_cl")
    shapes = [("64->64 @ 64^3", 180.50896445802326, 212.96342682439678, 350.75181445613276, 427.50889241854753),
              ("128->64 @ 64^3", 184.046293179447, 212.14944763520958, 349.6185927778245, 430.8925469576463),
              ("128->128 @ 48^3", 198.81879925740287, 217.23248893387225, 448.739424643282, 474.37754170867225),
              ("256->256 @ 32^3", 219.27236212696826, 240.81333530055173, 458.96076651675116, 471.8888562637976),
              ("64->64 @ 32^3", 236.53173186948095, 237.0674543275342, 449.78157197878124, 481.9855084287516),
              ("512->512 @ 16^3", 253.34541711658343, 247.87324036391033, 502.8178174131429, 504.96436017892336)]
    row = {"conv_shapes": [{"shape": shape, **dict(zip(kinds, rates))} for shape, *rates in shapes],
           "conv_gflops_best_by_kind": {k: max(s[1 + j] for s in shapes) for j, k in enumerate(kinds)}}
    printed = generation_speed.limit_table(row)
    assert_shown(printed, PERFORMANCE)
    assert_block(printed, PERFORMANCE)
    # the AMX Xeon's table (no stored row) has the same header and column alignment
    assert_block("\n".join(printed.splitlines()[:2]), PERFORMANCE, times=2)


def _decode_row(seconds, cpu, peak, decoder=None, **more):
    plan = None if decoder is None else {"tiles": 1, "storage": "float16", "spilled": False,
                                         "compute_plan": _plan("bfloat16", decoder)}
    return {"decode_s": seconds, "cpu_decode_s": cpu, "peak_rss_mib": peak, "plan": plan, **more}


def test_generation_speed_decode_table_has_the_form_in_performance():
    generation_speed = benchmark("generation_speed")
    # No decode run kept its JSON rows: the variants of the AMX Xeon's and the Zen 5's tables with
    # placeholder figures, to hold the header, the alignment and the row labels to the doc
    amx = generation_speed.decode_table({"reference": _decode_row(1, 1, 1), "ours": _decode_row(1, 1, 1, "float32"),
                                         "ours_bf16": _decode_row(1, 1, 1, "bfloat16")}, against="ours")
    zen5 = generation_speed.decode_table({"reference": _decode_row(1, 1, 1), "ours": _decode_row(1, 1, 1)})
    tables = [labels("\n".join(t)) for t in doc_tables(PERFORMANCE)]
    for printed in (amx, zen5):
        assert_block("\n".join(printed.splitlines()[:2]), PERFORMANCE)
        assert labels(printed) in tables


def test_decode_table_ratios_are_reference_over_ours():
    generation_speed = benchmark("generation_speed")
    # made-up figures: only the arithmetic and the layout are under test
    rows = {"reference": _decode_row(300.0, 600.0, 20000.0), "reference_reuse": _decode_row(250.0, 500.0, 21000.0),
            "ours": _decode_row(100.0, 150.0, 12000.0, "float32"), "ours_bf16": _decode_row(50.0, 120.0, 10000.0),
            "whole": _decode_row(400.0, 700.0, 3000.0)}
    agreement = {"reference": {"max_hu": 2000.0, "mean_hu": 20.04}, "ours": {"max_hu": 11.83, "mean_hu": 0.5812},
                 "ours_bf16": {"max_hu": 144.2, "mean_hu": 6.71}}
    assert generation_speed.decode_table(rows, agreement).splitlines() == [
        "| | decode s | CPU s | peak MiB | vs whole-volume decode: max / mean \\|d\\| HU |",
        "| --- | ---: | ---: | ---: | --- |",
        "| reference (the release's path, float32) | 300.0 | 600 | 20 000 | 2000.0 / 20.0 |",
        "| reference_reuse (the reference under our allocator policy) | 250.0 | 500 | 21 000 | |",
        "| ours, `auto` (float32 decoder) | 100.0 | 150 | 12 000 | 11.8 / 0.58 |",
        "| ours, `--precision bf16` | 50.0 | 120 | 10 000 | 144.2 / 6.7 |",
        "| whole (the exact whole-volume decode, float32) | 400.0 | 700 | 3000 | |",
        "| ratio reference / `auto` | 3.00x | 4.00x | 0.60 | |",  # 300 / 100, 600 / 150, 12000 / 20000
        "| ratio reference / `bf16` | 6.00x | 5.00x | 0.50 | |",
        "| ratio reference_reuse / `auto` | 2.50x | 3.33x | 0.57 | |",
        "| ratio reference_reuse / `bf16` | 5.00x | 4.17x | 0.48 | |"]
    # on CUDA the peak is the GPU's, and the column says so
    gpu = {v: {**rows[v], "cuda_peak_mib": rows[v]["peak_rss_mib"] / 10} for v in ("reference", "ours")}
    printed = generation_speed.decode_table(gpu).splitlines()
    assert "GPU peak MiB" in printed[0] and printed[2].split(" | ")[3] == "2000" and printed[-1].endswith("| 0.60 | |")


def test_decode_command_measures_against_the_float32_decoder_without_a_whole_decode(tmp_path, capsys):
    import argparse

    import numpy as np

    generation_speed = benchmark("generation_speed")
    args = argparse.Namespace(command="decode", shape=[8, 8, 4], device="cpu", threads=2, out=str(tmp_path / "g.jsonl"))
    rows = {"reference": _decode_row(3.0, 6.0, 200.0), "ours": _decode_row(1.0, 2.0, 100.0, "float32"),
            "ours_bf16": _decode_row(0.5, 1.0, 90.0, "bfloat16")}
    ours = np.full((8, 8, 4), 0.5, dtype=np.float32)
    for variant, shift in (("reference", 0.01), ("ours", 0.0), ("ours_bf16", 0.001)):
        np.save(tmp_path / f"g_decode8x8x4_{variant}.npy", ours + shift)
    generation_speed._table(args, {generation_speed._key(args, v): r for v, r in rows.items()})
    printed = capsys.readouterr().out
    assert "| | decode s | CPU s | peak MiB | vs ours, `auto` (float32 decoder): max / mean \\|d\\| HU |" in printed
    assert "| ours, `auto` (float32 decoder) | 1.0 | 2 | 100 | |" in printed  # the yardstick itself: no figures
    assert "| ours, `--precision bf16` | 0.5 | 1 | 90 | 2.0 / 2.0 |" in printed  # 0.001 of the 2000 HU range
    assert "| ratio reference / `auto` | 3.00x | 3.00x | 0.50 | |" in printed


def test_x0_error_table_is_the_one_in_results_section_5():
    from x0_error import table_head, table_row

    printed = "\n".join([table_head([50, 200, 400, 600, 800, 950]),
                         table_row("l1", "rflow", 2000, [0.060, 0.228, 0.437, 0.666, 0.924, 1.127]),
                         table_row("l2", "rflow", 2000, [0.059, 0.226, 0.442, 0.680, 0.941, 1.142])])
    first = RESULTS.index(printed.splitlines()[0])
    assert RESULTS[first:first + 4] == printed.splitlines()


def test_samplers_tables_are_the_ones_in_results():
    from samplers import tables

    # the figures of work/exp_samplers/results.json (docs/results.md section 1's run)
    results = {'args': {'floor_volumes': 'None', 'level': '0.95', 'reference_volumes': '32'},
     'paired': [{'a': 'rf-30',
                 'b': 'ddpm-1000',
                 'image_fid': {'difference': -1145.69251136823,
                               'interval': [-1890.3033948462767, -652.1854264025666]},
                 'latent_fid': {'difference': -7.648732027959639,
                                'interval': [-11.551679475537727, -4.930620683421884]}},
                {'a': 'ddim-30',
                 'b': 'ddpm-1000',
                 'image_fid': {'difference': 1044.4245898624447,
                               'interval': [345.32281328762474, 1712.868483593049]},
                 'latent_fid': {'difference': 23.800221202640557,
                                'interval': [20.169393395301775, 27.05654858986013]}},
                {'a': 'rf-30',
                 'b': 'rf-100',
                 'image_fid': {'difference': 1.665853105809635,
                               'interval': [1.430412047808822, 1.831463412242811]},
                 'latent_fid': {'difference': 0.010735693722509154,
                                'interval': [0.00953011023075927, 0.01172064074556296]}}],
     'rows': {'ddim-30': {'cpu_seconds_per_sample': 1.5396473969062505,
                          'image_fid': 2218.4910220822308,
                          'image_fid_interval': [1637.8200993886371, 2962.699158868017],
                          'latent_fid': 31.764988174888103,
                          'latent_fid_interval': [28.301204734124674, 36.30531596501957],
                          'nearest_training': {'interval': [1.2687971208168167, 1.3629957410151983],
                                               'mean': 1.3141523138811193}},
              'ddpm-1000': {'cpu_seconds_per_sample': 50.65915662240625,
                            'image_fid': 1174.066432219786,
                            'image_fid_interval': [681.746481501822, 1919.3958494937265],
                            'latent_fid': 7.964766972247546,
                            'latent_fid_interval': [5.24198791217632, 11.875368755153328],
                            'nearest_training': {'interval': [0.7563659933043, 0.9043640918894985],
                                                 'mean': 0.8255916566358077}},
              'floor': {'image_fid': 4.010587946205533,
                        'image_fid_interval': [1.8059361043413467, 20.925762995264066],
                        'latent_fid': 0.027098162724641384,
                        'latent_fid_interval': [0.014243975800394363, 0.0839951385252764],
                        'nearest_training': {'interval': [0.5200828697066711, 0.5476161840717929],
                                             'mean': 0.5343052241796002}},
              'reference': {'nearest_training': {'interval': [0.5118302222384826, 0.5466814742075055],
                                                 'mean': 0.5290110548465934}},
              'rf-10': {'cpu_seconds_per_sample': 0.52079444196875,
                        'distance_to_rf100': {'interval': [0.05543083528246579, 0.06585835005726781],
                                              'mean': 0.06023823642533842},
                        'image_fid': 33.42725006304871,
                        'image_fid_interval': [30.62723522122283, 38.29350598040106],
                        'latent_fid': 0.35394218277028244,
                        'latent_fid_interval': [0.33285643636974155, 0.37837177372604247],
                        'nearest_training': {'interval': [0.5117316145923418, 0.5267308947534565],
                                             'mean': 0.519165349466409}},
              'rf-100': {'cpu_seconds_per_sample': 4.648247879281252,
                         'distance_to_rf100': {'interval': [0.0, 0.0], 'mean': 0.0},
                         'image_fid': 26.708067745746387,
                         'image_fid_interval': [24.208595938170145, 31.723074187913294],
                         'latent_fid': 0.30529925056539753,
                         'latent_fid_interval': [0.2857659931416574, 0.32944638625227823],
                         'nearest_training': {'interval': [0.5319459035358092, 0.5505144510166432],
                                              'mean': 0.5410251620322597}},
              'rf-20': {'cpu_seconds_per_sample': 0.9699853297187486,
                        'distance_to_rf100': {'interval': [0.02676695016979392, 0.032095357061400556],
                                              'mean': 0.029223465350244414},
                        'image_fid': 29.632556540610608,
                        'image_fid_interval': [27.009437212310708, 34.5428843859604],
                        'latent_fid': 0.32351868527703687,
                        'latent_fid_interval': [0.3031493594257094, 0.3477794603104584],
                        'nearest_training': {'interval': [0.522198587047302, 0.5386142352066456],
                                             'mean': 0.5302738456266045}},
              'rf-30': {'cpu_seconds_per_sample': 1.391403105843751,
                        'distance_to_rf100': {'interval': [0.01606162229125149, 0.019330958027497118],
                                              'mean': 0.017594561930620548},
                        'image_fid': 28.373920851556022,
                        'image_fid_interval': [25.773622993088065, 33.36889698102369],
                        'latent_fid': 0.3160349442879067,
                        'latent_fid_interval': [0.295984380150723, 0.34041095096476803],
                        'nearest_training': {'interval': [0.5259789346329833, 0.543210179699429],
                                             'mean': 0.5345141220213073}},
              'rf-5': {'cpu_seconds_per_sample': 0.1891187678437499,
                       'distance_to_rf100': {'interval': [0.10472154526979816, 0.12229726179556975],
                                             'mean': 0.11289724479310202},
                       'image_fid': 39.285913712390006,
                       'image_fid_interval': [36.63467987455751, 43.69478966742865],
                       'latent_fid': 0.4106939166490733,
                       'latent_fid_interval': [0.38880191602209707, 0.43603165286302464],
                       'nearest_training': {'interval': [0.4977567401262154, 0.5109194735228239],
                                            'mean': 0.5042319968858675}},
              'rf-50': {'cpu_seconds_per_sample': 2.34723096915625,
                        'distance_to_rf100': {'interval': [0.007208630822583201, 0.008655995365814852],
                                              'mean': 0.007882598241623354},
                        'image_fid': 27.52992825720442,
                        'image_fid_interval': [24.973055404860443, 32.59114184308648],
                        'latent_fid': 0.31092612903429995,
                        'latent_fid_interval': [0.2911488428848587, 0.3352680181118746],
                        'nearest_training': {'interval': [0.5292478399106882, 0.5470417200461698],
                                             'mean': 0.5380414812306138}}},
     'samples': 32}
    printed = tables(results)
    assert_shown(printed, RESULTS)
    for block in printed.split("\n\n"):  # each table's rows together, in the printed order
        first = RESULTS.index(block.splitlines()[0])
        assert RESULTS[first:first + len(block.splitlines())] == block.splitlines()


def test_downstream_arms_tables_are_the_ones_in_results():
    """Section 3's five-seed run (#26 item 3): the figures of its results.json (rounded to 4-5 digits)."""
    from downstream import paired_table, table

    nan = float("nan")
    rows = [{"condition": "real only", "training_volumes": 8, "dice_mean": 0.6157, "dice_std": 0.1876, "dice_per_seed": [0.7835, 0.7632, 0.747, 0.4601, 0.3247], "found_mean": {"lung": 0.7426, "hepatic": nan}, "found_per_seed": {"lung": [0.7367, 0.8488, 0.6491, 0.753, 0.7252], "hepatic": [nan, nan, nan, nan, nan]}}, {"condition": "real + synthetic (none)", "training_volumes": 24, "dice_mean": 0.0712, "dice_std": 0.039, "dice_per_seed": [0.0348, 0.0726, 0.0887, 0.1339, 0.0258], "found_mean": {"lung": 0.277, "hepatic": nan}, "found_per_seed": {"lung": [0.1889, 0.4454, 0.2005, 0.3401, 0.21], "hepatic": [nan, nan, nan, nan, nan]}}, {"condition": "real + synthetic (paper)", "training_volumes": 24, "dice_mean": 0.1312, "dice_std": 0.0868, "dice_per_seed": [0.0297, 0.1358, 0.2796, 0.1499, 0.0607], "found_mean": {"lung": 0.3585, "hepatic": nan}, "found_per_seed": {"lung": [0.1843, 0.4118, 0.4278, 0.527, 0.2416], "hepatic": [nan, nan, nan, nan, nan]}}]
    paired = [{"pair": "real + synthetic (none) minus real only", "mean": -0.54452, "per_seed": [-0.74864, -0.69063, -0.65829, -0.32622, -0.29884], "cases_better": 0, "cases_worse": 30, "cases": 30, "interval": [-0.57025, -0.51867], "wilcoxon_p": 1.862645e-09, "seed_interval": [-0.81081, -0.27824]}, {"pair": "real + synthetic (paper) minus real only", "mean": -0.48455, "per_seed": [-0.75372, -0.62742, -0.46747, -0.31018, -0.26397], "cases_better": 0, "cases_worse": 30, "cases": 30, "interval": [-0.50661, -0.46247], "wilcoxon_p": 1.862645e-09, "seed_interval": [-0.74219, -0.22691]}, {"pair": "real + synthetic (paper) minus real + synthetic (none)", "mean": 0.05997, "per_seed": [-0.00507, 0.06321, 0.19082, 0.01604, 0.03487], "cases_better": 30, "cases_worse": 0, "cases": 30, "interval": [0.0499, 0.07034], "wilcoxon_p": 1.862645e-09, "seed_interval": [-0.03605, 0.156]}]
    assert_shown(table({"rows": rows}), RESULTS)
    assert_shown(paired_table({"paired": paired}), RESULTS)
