"""The experiments registry: tables, paper values, canonical ids, scale overlays."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hcformer import experiments as ex
from hcformer.commands import experiments as experiments_command
from hcformer.config import flatten, to_dict
from hcformer.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent / "experiments"
PAPER_TABLES = [
    "table1", "table2", "table3", "table4", "table5", "table6",
    "tableI_a", "tableI_b", "tableII", "tableIII", "tableIV", "tableV", "tableVI", "tableVII",
]  # fmt: skip
ID_RE = re.compile(r"^(coco_panoptic|coco_instance|ade20k|cityscapes)/[a-z0-9]+(-[A-Za-z0-9]+)+$")


@pytest.fixture()
def copy_root(tmp_path: Path) -> Path:
    """A private copy of experiments/ to break on purpose."""
    shutil.copytree(ROOT, tmp_path / "experiments")
    return tmp_path / "experiments"


def test_all_tables_load_in_paper_order():
    tables = ex.load_tables()
    assert [t.id for t in tables] == PAPER_TABLES


def test_every_row_has_paper_values_and_every_value_has_its_row():
    paper = yaml.safe_load((ROOT / "paper_values.yaml").read_text())["tables"]
    assert set(paper) == set(PAPER_TABLES)
    for table in ex.load_tables():
        # Numbers and their source only: the title and columns are the table YAML's.
        assert set(paper[table.id]) == {"source", "rows"}, table.id
        assert paper[table.id]["source"].startswith("arXiv:2205.09949v3, Table "), table.id
        labels = [r["label"] for r in paper[table.id]["rows"]]
        assert [r.label for r in table.rows] == labels, table.id
        for row, values in zip(table.rows, paper[table.id]["rows"], strict=True):
            assert set(values) == {"label", *table.columns}, (table.id, row.label)
            assert row.values == {c: values[c] for c in table.columns}
            # A row is quoted, or trained, or both (table III's MaskFormer).
            assert row.quoted or row.runs, (table.id, row.label)


def test_row_without_paper_values_is_an_error(copy_root: Path):
    path = copy_root / "tables" / "table5.yaml"
    path.write_text(path.read_text().replace("HCFormer R50 L2", "HCFormer R50 L9"))
    with pytest.raises(ConfigError, match=r"table5.yaml: row 'HCFormer R50 L9' has no values"):
        ex.load_tables(copy_root)


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("  table5:\n", "  table5:\n    title: Hierarchy level\n",
         r"paper_values.yaml: tables.table5: unknown keys \['title'\]; the file holds the paper's "
         r"numbers and their source only \(rows, source\): a table's title and columns live in "
         r"tables/table5.yaml"),
        ('{label: "HCFormer R50 L0", hierarchy_level: 0, pq: 41.9, gflops: 82, params_m: 37}',
         '{label: "HCFormer R50 L0", hierarchy_level: 0, pq: 41.9, params_m: 37, ap: 1.0}',
         r"paper_values.yaml: table table5, row 'HCFormer R50 L0': values of \['ap', "
         r"'hierarchy_level', 'params_m', 'pq'\]; expected one for each column of table5.yaml: "
         r"hierarchy_level, pq, gflops, params_m \(null where the paper prints '-'\)"),
        ('      - {label: "HCFormer R50 L3", hierarchy_level: 3, pq: 47.7, gflops: 87, params_m: 38}\n',
         '      - {label: "HCFormer R50 L3", hierarchy_level: 3, pq: 47.7, gflops: 87, params_m: 38}\n'
         '      - {label: "HCFormer R50 L4", hierarchy_level: 4, pq: 1.0, gflops: 1, params_m: 1}\n',
         r"paper_values.yaml: table table5: rows \['HCFormer R50 L4'\] have no row in .*table5.yaml"),
    ],
)  # fmt: skip
def test_paper_values_hold_each_columns_number_and_nothing_else(
    copy_root: Path, old: str, new: str, message: str
):
    path = copy_root / "paper_values.yaml"
    assert path.read_text().count(old) == 1
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(ConfigError, match=message):
        ex.load_tables(copy_root)


def test_paper_protocol_values():
    """Spot checks against App. D of the paper and the authors' configs (docs/fidelity.md)."""
    exps = ex.all_experiments("paper")
    r50 = exps["coco_panoptic/hcformer-r50-L3-D8-Q100"].config
    assert r50.model.num_classes == 133 and r50.data.task == "panoptic"
    assert r50.solver.iterations == 368750 and r50.solver.schedule == "step"
    assert r50.solver.steps == [327778, 355092]  # the authors' config, not the paper's 0.9/0.95
    assert (r50.data.test_short, r50.data.test_max, r50.data.augmentation) == (800, 1333, "lsj")
    assert r50.solver.batch_size == 16 and r50.solver.lr == 1e-4
    plus = exps["coco_panoptic/hcformer-r50-L3-D8-Q100-plus"].config
    assert plus.model.head.encoder_layers == 6 and plus.solver.iterations == 2 * 368750
    swinl = exps["coco_panoptic/hcformer-swinl-L3-D8-Q200"].config
    assert swinl.solver.iterations == 2 * 368750 and swinl.resources["gpus"] == 4
    assert exps["coco_instance/hcformer-r50-L3-D8-Q100"].config.model.num_classes == 80
    ade = exps["ade20k/hcformer-r50-L3-D8-Q100"].config
    assert (ade.model.num_classes, ade.solver.iterations, ade.solver.schedule) == (
        150,
        160000,
        "poly",
    )
    assert ade.data.crop == [512, 512] and ade.data.color_jitter
    ade_l = exps["ade20k/hcformer-swinl-L3-D8-Q100"].config
    assert ade_l.data.crop == [640, 640] and ade_l.data.test_short == 640
    city = exps["cityscapes/hcformer-r50-L3-D9-Q100"].config
    assert city.model.head.decoder_layers == 9 and city.data.crop == [512, 1024]
    assert exps["cityscapes/hcformer-r50-L3-D9-Q100-plus"].config.solver.iterations == 180000
    assert (
        exps["coco_panoptic/hcformer-r50-L3-D9-Q100-plus-std"].config.model.head.decoder
        == "standard"
    )


# The authors' training augmentation per dataset (their configs/*/Base-*.yaml and res640 configs):
# short sides, long-side cap, crop, image pad before normalisation, colour jitter, test resize.
ADE512 = [int(x * 0.1 * 512) for x in range(5, 21)]
ADE640 = [int(x * 0.1 * 640) for x in range(5, 21)]
CITY = [int(x * 0.1 * 1024) for x in range(5, 21)]


def test_paper_scale_augmentation_of_every_experiment():
    from hcformer.data.transforms import LSJ_IMAGE_PAD, max_train_size, scale_choices
    from hcformer.engine.batches import eval_pad_value, train_pad_size, train_pad_value

    seen = set()
    for exp_id, exp in ex.all_experiments("paper").items():
        cfg = exp.config
        data = cfg.data
        test = (data.test_short, data.test_max)
        if data.dataset.startswith("coco"):
            assert (data.augmentation, data.lsj_size, data.scale_range) == ("lsj", 1024, [0.1, 2.0])
            assert not data.color_jitter and test == (800, 1333), exp_id
            assert LSJ_IMAGE_PAD == 128 and train_pad_value(cfg) == 128.0
            assert train_pad_size(cfg) == (1024, 1024)
            seen.add("coco")
            continue
        assert data.augmentation == "scale_crop" and data.color_jitter, exp_id
        choices, cap = scale_choices(data), max_train_size(data)
        if data.dataset == "cityscapes":
            assert (choices, cap, data.crop, test) == (CITY, 4096, [512, 1024], (1024, 2048))
            assert train_pad_value(cfg) == eval_pad_value()  # the mean: 0 once normalised
            assert choices[0] == 512 and choices[-1] == 2048, exp_id
        elif data.crop == [640, 640]:  # ADE20K Swin-L rows (res640)
            assert (choices, cap, test) == (ADE640, 2560, (640, 2560)), exp_id
            assert train_pad_value(cfg) == 128.0
        else:
            assert (choices, cap, data.crop, test) == (ADE512, 2048, [512, 512], (512, 2048))
            assert train_pad_value(cfg) == 128.0, exp_id
        assert train_pad_size(cfg) == tuple(data.crop)
        seen.add(f"{data.dataset}{data.crop[0]}")
    assert seen == {"coco", "ade20k512", "ade20k640", "cityscapes512"}


def test_tiny_scale_keeps_its_augmentation():
    from hcformer.data.transforms import max_train_size, scale_choices

    exps = ex.all_experiments("tiny")
    city = exps["cityscapes/hcformer-r50-L3-D9-Q100"].config.data
    assert scale_choices(city) == [int(x * 0.1 * 192) for x in range(5, 21)]
    assert max_train_size(city) == 768 and city.crop == [192, 384]
    ade = exps["ade20k/hcformer-r50-L3-D8-Q100"].config.data
    assert scale_choices(ade)[-1] == 384 and max_train_size(ade) == 768 and not ade.color_jitter


# The authors' SOLVER.STEPS of each COCO schedule (50, 100 and 200 epochs).
COCO_STEPS = {368750: [327778, 355092], 737500: [655556, 710184], 1475000: [1311112, 1420368]}


def test_step_decay_iterations_are_the_authors_at_paper_scale():
    from hcformer.engine.optim import lr_factor, milestones

    found = set()
    for exp_id, exp in ex.all_experiments("paper").items():
        solver = exp.config.solver
        if solver.schedule != "step":
            continue
        assert exp_id.startswith("coco_"), exp_id
        expected = COCO_STEPS[solver.iterations]
        assert milestones(solver) == expected and solver.steps == expected, exp_id
        first = expected[0]
        assert lr_factor(first - 1, solver) == 1.0 and lr_factor(first, solver) == 0.1
        found.add(solver.iterations)
    assert found == set(COCO_STEPS)  # every schedule is used by some row


def test_step_decay_at_the_tiny_and_smoke_scales_is_unchanged():
    from hcformer.engine.optim import milestones

    for scale, expected in (
        ("tiny", {300: [266, 288], 600: [533, 577], 1200: [1066, 1155]}),
        ("smoke", {6: [5, 5]}),
    ):
        for exp_id, exp in ex.all_experiments(scale).items():
            solver = exp.config.solver
            if solver.schedule == "step":
                assert solver.steps == [0.889, 0.963], (scale, exp_id)
                assert milestones(solver) == expected[solver.iterations], (scale, exp_id)


def test_steps_beyond_the_iterations_are_a_config_error():
    import torch

    from hcformer.config import SolverConfig
    from hcformer.engine.optim import build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    solver = SolverConfig(iterations=1000, schedule="step", steps=[327778, 355092])
    with pytest.raises(
        ConfigError, match=r"solver.steps: \[327778, 355092\] lie beyond solver.iterations 1000"
    ):
        build_scheduler(optimizer, solver)
    build_scheduler(optimizer, SolverConfig(iterations=1000, schedule="poly", steps=[327778]))
    build_scheduler(optimizer, SolverConfig(iterations=1000, schedule="step", steps=[0.5, 900]))


def test_ids_readable_unique_and_content_derived():
    exps = ex.all_experiments("paper")
    assert 60 <= len(exps) <= 75
    hashes = {}
    for exp_id, exp in exps.items():
        assert ID_RE.match(exp_id), exp_id
        assert exp_id.startswith(exp.config.data.dataset + "/")
        hashes[exp_id] = ex.config_hash(exp.config)
    # Different configs never share an id (dict keys), and one config never has two ids.
    assert len(set(hashes.values())) == len(hashes)
    # Same config from different tables -> the same experiment.
    shared = exps["coco_panoptic/hcformer-r50-L3-D8-Q100"].rows
    for row in [("table1", "HCFormer R50"), ("table5", "HCFormer R50 L3"),
                ("table6", "HCFormer R50 D8"), ("tableIV", "HCFormer R50 Q100")]:  # fmt: skip
        assert row in shared
    # Stable: recomputing from a fresh copy of the files gives the same ids.
    assert list(ex.all_experiments("paper", root=ROOT)) == list(exps)


def test_ids_do_not_depend_on_scale():
    paper = ex.all_experiments("paper")
    for scale in ("tiny", "smoke"):
        scaled = ex.all_experiments(scale)
        assert list(scaled) == list(paper)
        assert all(scaled[i].rows == paper[i].rows for i in paper)


def test_colliding_names_get_distinct_hashed_ids(copy_root: Path):
    path = copy_root / "tables" / "table5.yaml"
    text = path.read_text().replace(
        "{label: HCFormer R50 L1, set: {model.backbone.hierarchy_level: 1}}",
        "{label: HCFormer R50 L1, set: {model.backbone.hierarchy_level: 3, solver.lr: 2.0e-4}}",
    )
    path.write_text(text)
    exps = ex.all_experiments("paper", root=copy_root)
    ids = [i for i in exps if i.startswith("coco_panoptic/hcformer-r50-L3-D8-Q100-h")]
    assert len(ids) == 2 and "coco_panoptic/hcformer-r50-L3-D8-Q100" not in exps
    lrs = sorted(exps[i].config.solver.lr for i in ids)
    assert lrs == [1e-4, 2e-4]
    table5 = ex.load_table("table5", copy_root)
    assert (
        table5.row("HCFormer R50 L1").experiment_ids != table5.row("HCFormer R50 L3").experiment_ids
    )


def test_table_II_L0_rows_are_one_experiment():
    table = ex.load_table("tableII")
    with_dcn = table.row("HCFormer R50 L0 DCNv2").experiment_ids
    without = table.row("HCFormer R50 L0 no DCNv2").experiment_ids
    assert with_dcn == without == ex.load_table("table5").row("HCFormer R50 L0").experiment_ids
    # ... while at L1-L3 the two rows differ.
    assert (
        table.row("HCFormer R50 L1 DCNv2").experiment_ids
        != table.row("HCFormer R50 L1 no DCNv2").experiment_ids
    )
    cfg = ex.resolve(with_dcn[0], "paper")
    assert cfg.model.backbone.hierarchy_level == 0


def test_table_IV_rows_combine_three_datasets():
    table = ex.load_table("tableIV")
    assert table.dataset is None
    for row in table.rows:
        q = row.values["queries"]
        assert [(r.column, r.metric) for r in row.runs] == [
            ("coco_pq", "pq"), ("ade20k_miou", "miou"), ("cityscapes_miou", "miou")
        ]  # fmt: skip
        for run in row.runs:
            for scale in ex.scales():
                cfg = ex.resolve(run.experiment_id, scale)
                assert cfg.data.dataset == run.dataset and cfg.model.head.queries == q


def test_quoted_and_baseline_rows():
    table3 = ex.load_table("tableIII")
    maskformer = table3.row("MaskFormer R50")
    assert maskformer.quoted and maskformer.source and maskformer.requires == "baselines"
    (exp_id,) = maskformer.experiment_ids
    cfg = ex.resolve(exp_id)
    assert cfg.model.head.type == "maskformer" and cfg.solver.iterations == 554250
    assert ex.load_table("table1").row("Mask2Former R50").runs == ()
    per_pixel = ex.experiments_for_table("tableI_b")
    assert {e.config.model.head.type for e in per_pixel} == {"fcn32s", "fpn", "pspnet", "deeplabv3"}
    assert all(e.requires == "baselines" for e in per_pixel)
    assert ex.resolve("cityscapes/pspnet-r101-os8").model.backbone.output_stride == 8


@pytest.mark.parametrize("scale", ["tiny", "smoke"])
def test_scale_overlays_never_change_varied_keys(scale: str):
    paper = ex.all_experiments("paper")
    for exp_id, exp in ex.all_experiments(scale).items():
        small, big = flatten(to_dict(exp.config)), flatten(to_dict(paper[exp_id].config))
        for key in ex.VARIED_KEYS:
            assert small[key] == big[key], (exp_id, key)
        assert small["model.backbone.pretrained"] == ""
        assert exp.config.data.synthetic is not None
        assert exp.config.data.root == f"datasets/synthetic/{exp.config.data.dataset}"
        assert exp.config.resources["gpus"] == 0
    queries = {e.config.model.head.queries for e in ex.experiments_for_table("tableIV", scale)}
    assert queries == {20, 50, 100, 150, 200}


def test_tiny_and_smoke_schedules():
    tiny = ex.all_experiments("tiny")
    smoke = ex.all_experiments("smoke")
    base = "coco_panoptic/hcformer-r50-L3-D8-Q100"
    assert tiny[base].config.solver.iterations == 300
    assert tiny[base + "-plus"].config.solver.iterations == 600  # HCFormer+ trains twice as long
    assert {e.config.solver.iterations for e in smoke.values()} == {6}
    # smoke extends tiny: same models and data.
    assert to_dict(smoke[base].config)["model"] == to_dict(tiny[base].config)["model"]
    assert smoke[base].config.data.root == tiny[base].config.data.root


def test_tiny_num_classes_match_the_synthetic_data(tmp_path: Path):
    """The engine refuses a model whose num_classes differs from the dataset's."""
    import dataclasses

    from hcformer.data import build_dataset

    for exp_id in ("coco_panoptic/hcformer-r50-L3-D8-Q100", "coco_instance/hcformer-r50-L3-D8-Q100",
                   "ade20k/hcformer-r50-L3-D8-Q100", "cityscapes/hcformer-r50-L3-D9-Q100"):  # fmt: skip
        cfg = ex.resolve(exp_id, "tiny")
        synth = dataclasses.replace(cfg.data.synthetic, train_images=2, val_images=2, size=[64, 64])
        data = dataclasses.replace(cfg.data, root=str(tmp_path / exp_id), synthetic=synth)
        assert build_dataset(data, "val").num_classes == cfg.model.num_classes, exp_id


@pytest.mark.parametrize(
    "section",
    [
        "common:\n  model.head.queries: 10\n",
        "common:\n  model: {backbone: {hierarchy_level: 1}}\n",
        "dataset:\n  ade20k: {model.head.decoder_layers: 2}\n",
        "backbone:\n  resnet50: {model.backbone: {dcnv2: false}}\n",
        "head:\n  hcformer: {model.head: {type: maskformer}}\n",
    ],
)
def test_bad_overlay_is_refused(copy_root: Path, section: str):
    (copy_root / "scales" / "broken.yaml").write_text(section)
    with pytest.raises(ConfigError, match=r"broken.yaml: .*a key that a paper table varies"):
        ex.all_experiments("broken", root=copy_root)


def test_overlay_with_unknown_config_key_names_the_file(copy_root: Path):
    (copy_root / "scales" / "typo.yaml").write_text("common:\n  solver.iteration: 5\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'solver.iteration'"):
        ex.all_experiments("typo", root=copy_root)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown table 'table9'; valid tables: table1, "):
        ex.load_table("table9")
    with pytest.raises(ConfigError, match=r"unknown experiment .*did you mean"):
        ex.resolve("coco_panoptic/hcformer-r50-L3-D8-Q101")
    with pytest.raises(
        ConfigError, match=r"unknown scale 'huge'; valid scales: paper, smoke, tiny"
    ):
        ex.all_experiments("huge")


def test_cli_json_and_table(capsys: pytest.CaptureFixture[str]):
    assert experiments_command.main(["--table", "table5", "--scale", "tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in data] == [f"coco_panoptic/hcformer-r50-L{k}-D8-Q100" for k in range(4)]
    assert data[0]["config"]["solver"]["iterations"] == 300
    assert ["table5", "HCFormer R50 L0"] in data[0]["rows"]
    assert experiments_command.main(["--table", "tableII"]) == 0
    out = capsys.readouterr().out
    assert "coco_panoptic/hcformer-r50-L1-D8-Q100-nodcn" in out and "7 experiments" in out


def test_cli_error_is_one_line_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "hcformer.cli", "experiments", "--table", "nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "valid tables: table1" in proc.stderr


def test_registry_imports_no_torch():
    code = (
        "import sys, hcformer.experiments as e; e.all_experiments(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_scales_are_the_overlay_files_and_every_scale_option_offers_them(
    copy_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    from hcformer import cli

    assert ex.scales() == ("paper", "smoke", "tiny")
    (copy_root / "scales" / "mini.yaml").write_text("extends: tiny\n")
    assert ex.scales(copy_root) == ("mini", "paper", "smoke", "tiny")
    monkeypatch.setenv("HCFORMER_EXPERIMENTS", str(copy_root))
    for command in ("aggregate", "tables", "status", "run"):
        with pytest.raises(SystemExit):
            cli.main([command, "--scale", "huge"])
        err = capsys.readouterr().err
        assert re.search(r"--scale: invalid choice: .*huge.*mini.*paper.*smoke.*tiny", err), err


FIGURE_TABLES = ["table5", "table6", "tableII", "tableIV", "tableV", "tableVI", "tableVII"]


def test_every_table_column_is_described_in_columns_yaml_and_figures_are_flagged():
    described = yaml.safe_load((ROOT / "columns.yaml").read_text())["columns"]
    for table in ex.load_tables():
        assert table.kinds == {c: described[c]["kind"] for c in table.columns}, table.id
    assert [t.id for t in ex.load_tables() if t.figure] == FIGURE_TABLES
    assert ex.x_columns() == ("hierarchy_level", "decoder_layers", "queries")
    assert ex.columns_of("profile") == ("params_m", "gflops", "latency_ms")
    assert ex.columns()["dcnv2"].axis == "hue" and ex.columns()["decoder_layers"].scale == "log2"


@pytest.mark.parametrize(
    "file, old, new, message",
    [
        ("tables/table5.yaml", "columns: [hierarchy_level, pq,", "columns: [hierarchy_level, pqq,",
         r"table5.yaml: column 'pqq' is not in .*columns.yaml; known columns: pq, pq_th"),
        ("tables/table1.yaml", "rows:", "figure: true\nrows:",
         r"table1.yaml: a figure needs a column to plot against \(axis: x in .*columns.yaml: "
         r"hierarchy_level, decoder_layers, queries\)"),
        ("tables/table5.yaml", "figure: true", "figure: sometimes",
         r"table5.yaml: figure must be true or false, got 'sometimes'"),
        ("tables/table5.yaml", "title:", "titel: x\ntitle:", r"table5.yaml: unknown keys \['titel'\]"),
        ("columns.yaml", "pq: {kind: metric,", "pq: {kind: score,",
         r"columns.yaml: pq: needs 'kind' \(one of metric, profile, setting\), 'latex' and 'plain'"),
        ("columns.yaml", "axis: hue}", "axis: y}", r"columns.yaml: dcnv2: 'axis' is x or hue"),
    ],
)  # fmt: skip
def test_bad_column_or_figure_flag_names_the_file(
    copy_root: Path, file: str, old: str, new: str, message: str
):
    path = copy_root / file
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(ConfigError, match=message):
        ex.load_tables(copy_root)
