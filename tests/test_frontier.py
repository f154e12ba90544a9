"""The frontier's bookkeeping: each point's params, the `dvc exp run -S` overrides that make them (applied here
with DVC's own override code), and the table collected from `dvc exp show --json`. The real sweep over the
tiny pipeline is in test_pipeline_frontier.py."""

from __future__ import annotations

import copy

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from attnsae import config
from attnsae.errors import UserError
from attnsae.reporting import frontier

POINTS = {
    "standard": {"values": [0.01, 0.1], "settings": {"lr": 1.2e-3}},
    "topk": {"values": [4, 16], "settings": {"lr": 4e-4, "beta2": 0.999, "auxk_dead_tokens": 4096}},
    "batchtopk": {"values": [8], "settings": {"lr": 4e-4}},
    "jumprelu": {"values": [0.003], "settings": {"beta1": 0.0, "beta2": 0.999, "jumprelu_bandwidth": 0.01}},
}


@pytest.fixture
def params(tiny_params):
    tiny_params["frontier"] = copy.deepcopy(POINTS)
    return tiny_params


def test_every_point_is_queued_in_order(params):
    points = config.frontier_config(params).points()
    assert [(a, v) for a, v, _ in points] == [("standard", 0.01), ("standard", 0.1), ("topk", 4), ("topk", 16),
                                             ("batchtopk", 8), ("jumprelu", 0.003)]
    assert isinstance(points[2][1], int)  # k stays an integer


@pytest.mark.parametrize(("architecture", "value"), [("standard", 0.1), ("topk", 16), ("jumprelu", 0.003)])
def test_a_point_trains_its_architecture_on_every_layer(params, architecture, value):
    point = frontier.point_params(params, architecture, value, POINTS[architecture]["settings"])
    setting = config.SPARSITY_SETTINGS[architecture]
    for layer in config.layers(point):
        cfg = config.sae_config(point, layer)
        assert (cfg.architecture, getattr(cfg, setting)) == (architecture, value)
        for key, expected in POINTS[architecture]["settings"].items():
            assert getattr(cfg, key) == expected, key
    assert params["per_layer"]["L2"] == {"l1_coeff": 0.02}  # the input is left as it was


@pytest.mark.parametrize(("architecture", "value"), [("standard", 0.1), ("topk", 16), ("batchtopk", 8),
                                                     ("jumprelu", 0.003)])
def test_dvc_applies_the_overrides_to_exactly_the_point(params, tmp_path, architecture, value):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    target = frontier.point_params(params, architecture, value, POINTS[architecture]["settings"])
    apply_overrides(path, frontier.overrides(params, target))
    applied = yaml.safe_load(path.read_text())
    assert applied["sae"] == target["sae"] and applied["per_layer"] == target["per_layer"]
    assert applied["frontier"] == POINTS  # everything else as it was


def test_a_bad_point_is_refused_before_anything_is_queued(params):
    params["frontier"]["topk"]["settings"]["lr"] = -1.0
    with pytest.raises(UserError, match=r"frontier\.topk point 4: params.yaml: bad value for 'sae.lr'"):
        frontier.queue_commands(params)


def test_queue_commands_name_and_target_each_point(params):
    commands = frontier.queue_commands(params)
    assert len(commands) == 6
    first = commands[2]
    assert first[:7] == ["dvc", "exp", "run", "--queue", "evaluate", "--name", "frontier-topk-4"]
    assert "++sae.architecture='topk'" not in first and '++sae.architecture="topk"' in first
    assert "~sae.l1_coeff" in first and "~per_layer.L2.l1_coeff" in first and "++sae.k=4" in first


def test_no_frontier_section_is_one_line(tiny_params):
    with pytest.raises(UserError, match="no frontier points to queue"):
        frontier.queue_commands(tiny_params)


def test_frontier_section_values_are_checked(params):
    params["frontier"]["topk"]["values"] = []
    with pytest.raises(UserError, match="frontier.topk.values"):
        config.validate(params)


def exp_show(points: dict[str, tuple[str, float, dict[int, dict]]]) -> list[dict]:
    """A `dvc exp show --json` document: the workspace, then a baseline with these experiments."""
    def data(architecture, value, metrics):
        setting = config.SPARSITY_SETTINGS[architecture]
        params = {"layers": sorted(metrics), "sae": {"architecture": architecture, setting: value},
                  "per_layer": {f"L{n}": {} for n in metrics}}
        files = {f"reports/metrics/L{n}.json": {"data": m} for n, m in metrics.items()}
        files |= {f"reports/metrics_heldout/L{n}.json": {"data": {"l0": m["l0"] * 2}} for n, m in metrics.items()}
        return {"params": {"params.yaml": {"data": params}}, "metrics": files}

    experiments = [{"name": name, "revs": [{"rev": name, "data": {"rev": name, **data(*point)}}]}
                   for name, point in points.items()]
    return [{"rev": "workspace", "data": {}}, {"rev": "abc", "data": {}, "experiments": experiments}]


def test_collect_reads_every_frontier_experiment(tmp_path):
    show = exp_show({
        "frontier-topk-20": ("topk", 20, {3: {"l0": 19.5, "ce_increase": 0.02, "ce_increase_se": 0.001,
                                              "loss_recovered": 0.9, "dead_fraction": 0.01}}),
        "frontier-standard-0.4": ("standard", 0.4, {3: {"l0": 30.0, "loss_recovered": 0.8}}),
        "my-own-experiment": ("standard", 1.0, {3: {"l0": 5.0}}),
    })
    # a running experiment: DVC shows its temporary workspace, whose metrics are still the baseline's
    running = exp_show({"frontier-jumprelu-0.005": ("jumprelu", 0.005, {3: {"l0": 20.0}})})[1]["experiments"][0]
    running["revs"][0]["data"]["rev"] = "workspace"
    show[1]["experiments"].append(running)
    rows = frontier.frontier_rows(show)
    assert [(r["architecture"], r["value"], r["layer"]) for r in rows] == [("standard", 0.4, 3), ("topk", 20, 3)]
    assert frontier.unfinished(show, rows) == ["frontier-jumprelu-0.005"]
    assert rows[1]["ce_increase_se"] == 0.001 and rows[1]["heldout_l0"] == 39.0
    assert rows[0]["ce_increase"] is None  # a metric the experiment lacks stays empty
    path = tmp_path / "frontier.csv"
    path.write_text(frontier.frontier_csv(rows))
    back = frontier.read_frontier(path)
    assert back[1]["l0"] == 19.5 and back[0]["ce_increase"] is None and back[1]["architecture"] == "topk"


def test_read_frontier_refuses_another_table(tmp_path):
    path = tmp_path / "frontier.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="not a frontier table"):
        frontier.read_frontier(path)
    assert frontier.read_frontier(tmp_path / "missing.csv") == []


def test_markdown_and_figure_show_every_point():
    rows = frontier.frontier_rows(exp_show({
        "frontier-topk-20": ("topk", 20, {3: {"l0": 19.5, "ce_increase": 0.02, "ce_increase_se": 0.001,
                                              "loss_recovered": 0.9, "dead_fraction": 0.01}}),
        "frontier-jumprelu-0.005": ("jumprelu", 0.005, {3: {"l0": 25.0, "ce_increase": 0.03,
                                                            "loss_recovered": 0.85, "dead_fraction": 0.0}}),
    }))
    table = frontier.frontier_markdown(rows)
    assert "| 3 | topk | k 20 | 19.5 | 0.0200 ± 0.0010 | 0.900 | 1.0% | 39.0 | n/a | n/a |" in table
    assert "| 3 | jumprelu | l0_coeff 0.005 | 25.0 | 0.0300 | 0.850 | 0.0% | 50.0 | n/a | n/a |" in table
    fig = frontier.frontier_figure(rows)
    ce_axis, lr_axis = fig.axes[:2]
    assert [t.get_text() for t in ce_axis.get_legend().get_texts()] == ["topk", "jumprelu"]
    assert sorted(t.get_text() for t in lr_axis.texts) == ["0%", "1%"]  # dead fraction beside each point

