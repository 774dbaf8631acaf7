import json

import numpy as np
import pytest

from cost_models.cluster import SCHEMA, Cluster, ExpertShape
from cost_models.files import InputError
from tests.file_helpers import assert_rejected
from cost_models.presets import PRESETS, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(tmp_path, name):
    c = preset(name, slots=3)
    c.save(tmp_path / "c.json")
    back = Cluster.load(tmp_path / "c.json")
    assert back == c
    assert back.to_dict() == c.to_dict()
    assert back.provenance["references"]  # every preset names its sources


def test_preset_shapes_and_graph():
    a100 = preset("dgx-a100-2x8", slots=3)
    assert (a100.num_devices, a100.num_nodes) == (16, 2)
    assert a100.link_class(0, 7) == "intra" and a100.link_class(0, 8) == "inter"
    g = a100.graph()
    assert g.number_of_nodes() == 16 and g.number_of_edges() == 16 * 15
    assert g.edges[0, 8]["cls"] == "inter"
    assert a100.inv_beta[0, 8] > a100.inv_beta[0, 1] > 0 and a100.inv_beta[3, 3] == 0
    h100 = preset("dgx-h100-8x8", slots=5)
    assert (h100.num_devices, h100.num_nodes, int(h100.slots.sum())) == (64, 8, 320)


def test_node_index_numbers_any_node_ids_densely():
    """Cluster files may number nodes 5 and 9; per-node sums go through the dense index."""
    base = preset("dgx-a100-2x8", slots=3)
    ids = {0: 9, 1: 5}
    c = Cluster.from_dict({**base.to_dict(), "devices": [{**d, "node": ids[d["node"]]}
                                                          for d in base.to_dict()["devices"]]})
    assert c.node_index.tolist() == [1] * 8 + [0] * 8
    assert c.node_onehot.shape == (16, 2) and (c.node_onehot.sum(axis=1) == 1).all()
    assert (c.node_onehot[:, 1] == (c.node_of == 9)).all()


def test_pair_override_wins(tmp_path):
    doc = preset("dgx-a100-2x8").to_dict()
    doc["pairs"] = [{"src": 0, "dst": 9, "alpha": 1e-3, "beta": 1e9}]
    (tmp_path / "c.json").write_text(json.dumps(doc))
    c = Cluster.load(tmp_path / "c.json")
    assert c.link(0, 9).beta == 1e9 and c.link(9, 0).beta == 22e9
    assert c.inv_beta[0, 9] == pytest.approx(1e-9)
    assert c.graph().edges[0, 9]["override"]


def test_expert_shape_bytes():
    e = ExpertShape(1024, 4096, "bf16")
    assert e.params == 2 * 1024 * 4096 + 1024 + 4096
    assert e.param_bytes == 2 * e.params and e.token_bytes == 2048 and e.optimizer_bytes == 12 * e.params


def _bad(mutate):
    doc = preset("dgx-a100-2x8").to_dict()
    mutate(doc)
    return doc


@pytest.mark.parametrize("doc, message", [
    ('{"schema": "flexmoe.cluster/1", "devices": [', "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (_bad(lambda d: d.pop("schema")), "missing 'schema'"),
    (_bad(lambda d: d.update(schema="flexmoe.cluster/99")), "unsupported schema"),
    (_bad(lambda d: d["devices"][3].update(id=7)), "device ids must be 0..15"),
    (_bad(lambda d: d["devices"][0]["compute"].update(b="fast")), "must be a number"),
    (_bad(lambda d: d["devices"][0]["compute"].update(b=-1.0)), "must be positive"),
    (_bad(lambda d: d["devices"][0].update(slots=-2)), "slots must be >= 0"),
    (_bad(lambda d: d["links"].pop("inter")), "'inter' class"),
    (_bad(lambda d: d.update(pairs=[{"src": 0, "dst": 99, "alpha": 0, "beta": 1}])), "unknown device id 99"),
    (_bad(lambda d: [x.update(slots=0) for x in d["devices"]]), "no device has an expert slot"),
    (_bad(lambda d: d.pop("devices")), "missing or mistyped field 'devices'"),
    (_bad(lambda d: d["expert"].update(dtype="int3")), "dtype"),
])
def test_bad_cluster_files_name_file_and_problem(tmp_path, doc, message):
    assert_rejected(Cluster.load, tmp_path / "cluster.json", doc, message)


def test_nan_literal_rejected(tmp_path):
    text = json.dumps(preset("local-cpu").to_dict()).replace('"a": 0.0002', '"a": NaN')
    assert_rejected(Cluster.load, tmp_path / "cluster.json", text, "NaN")


def test_fewer_slots_than_experts():
    with pytest.raises(InputError, match="fewer than the 40 experts"):
        preset("dgx-a100-2x8", slots=2).check_fits(40)
    preset("dgx-a100-2x8", slots=2).check_fits(32)


def test_schema_constant():
    assert preset("local-cpu").to_dict()["schema"] == SCHEMA
    assert np.all(preset("local-cpu", world_size=4).slots == 2)
