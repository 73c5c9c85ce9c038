"""What a site's process pays before it can answer: no torch for messages that need none.

In deployment the SuperNode starts a fresh ``flwr-clientapp`` process for every message, train,
evaluate and each secure-aggregation stage alike, and each imports ``client.app``. Importing
torch, Opacus and scikit-learn takes seconds on a loaded hospital server; the key and share
exchanges of secure aggregation and every refusal need none of them. Each test runs a fresh
interpreter (the test process itself has long imported torch) and lists what it loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

HEAVY = ("torch", "opacus", "sklearn", "scipy")


def _heavy_loaded_by(code: str) -> list[str]:
    """The heavy packages a fresh interpreter at the repository root has loaded after ``code``."""
    report = f"import json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", f"{code}\n{report}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{code!r} failed:\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.splitlines()[-1])


def test_importing_the_client_app_loads_no_torch_opacus_or_sklearn():
    assert _heavy_loaded_by("import client.app") == []


def test_a_refusal_and_the_key_and_share_stages_load_no_torch_opacus_or_sklearn(tmp_path):
    """The real ClientApp answers, through its handlers and the egress log: an unapproved app's
    train message, an evaluate message of another task, and secure aggregation's key
    advertisement and share exchange among three sites."""
    code = f"from tests.test_import_cost import answer_light_messages\n" \
           f"answer_light_messages({str(tmp_path)!r})"
    assert _heavy_loaded_by(code) == []


def answer_light_messages(folder: str) -> None:
    """Run in the fresh interpreter: the messages a site answers without training, through
    ``client.app:app`` on Flower's ``Message``/``Context`` (tests/in_process_grid.py). Every
    import here must itself be light, or the test proves nothing."""
    from flwr.app import ConfigRecord, RecordDict

    from client.app import app
    from privacy import protocol
    from privacy.compat import server_task_identity
    from privacy.run_settings import RunSettings, TrainSettings
    from privacy.secagg import SecAggServer, setup
    from privacy.secagg.identity import write_ephemeral_federation
    from tests.in_process_grid import RUN_ID, SERVER_NODE_ID, InProcessGrid

    root = Path(folder)
    settings = RunSettings(task={"name": "tabular"}, model={"name": "mlp"},
                           train=TrainSettings(local_epochs=1, batch_size=8, lr=0.1))
    config = ConfigRecord({**protocol.encode_run_settings(settings), protocol.SERVER_ROUND: 1})
    sites = [f"hospital_{i}" for i in range(3)]
    identities = write_ephemeral_federation(root / "federation", sites)

    def deployed(site: str) -> dict[str, object]:
        return {"site-id": site, "data-path": str(root / site), "state-dir": str(root / site),
                "require-dp": False}

    # nodes 0-2 take part in secure aggregation; 3 has approved no app version (the deployed
    # default); 4 holds another task's data
    nodes = {i: {**deployed(site), "require-approval": False, **identities[site]}
             for i, site in enumerate(sites)}
    nodes[3] = deployed("hospital_unapproved")
    nodes[4] = {**deployed("hospital_vitals"), "require-approval": False, "task": "vitals"}
    grid = InProcessGrid(app, nodes)

    def send(message_type: str, contents: dict[int, RecordDict]) -> dict[int, RecordDict]:
        messages = [grid.create_message(content, message_type, node, "1")
                    for node, content in contents.items()]
        replies = grid.send_and_receive(messages)
        assert not any(r.has_error() for r in replies), [r.error for r in replies]
        return {r.metadata.src_node_id: r.content for r in replies}

    def secagg(content: RecordDict) -> dict[str, object]:
        assert content[protocol.SITE][protocol.STATUS] == protocol.STATUS_OK, dict(
            content[protocol.SITE])
        return dict(content[protocol.SECAGG])

    with server_task_identity(RUN_ID, SERVER_NODE_ID):
        refused = send("train", {3: RecordDict({protocol.CONFIG: config})})
        refused |= send("evaluate", {4: RecordDict({protocol.CONFIG: config})})
        status = {node: dict(content[protocol.SITE]) for node, content in refused.items()}
        assert status[3][protocol.STATUS] == status[4][protocol.STATUS] == protocol.STATUS_REFUSED
        assert "not approved" in status[3][protocol.REASON], status
        assert "task 'vitals'" in status[4][protocol.REASON], status

        server = SecAggServer(setup(len(sites), session=b"import-cost", seed=0))
        public = {protocol.SECAGG_CLIP: 0.5, protocol.SECAGG_MAX_EXAMPLES: 100,
                  protocol.SECAGG_NUM_SITES: len(sites)}
        keys = send(f"train.{protocol.SECAGG_ADVERTISE_KEYS}", {
            i: RecordDict({protocol.SECAGG: ConfigRecord({**site_config, **public}),
                           protocol.CONFIG: config})
            for i, site_config in server.site_configs().items()})
        routed = server.route_public_keys({i: secagg(content) for i, content in keys.items()})
        shares = send(f"train.{protocol.SECAGG_SHARE_KEYS}", {
            i: RecordDict({protocol.SECAGG: ConfigRecord(fields)}) for i, fields in routed.items()})
        server.route_shares({i: secagg(content) for i, content in shares.items()})


def test_building_a_model_without_dp_loads_no_opacus():
    """The server, the pooled evaluation and every site build their model; without DP none of
    them pays for Opacus (a second or more of start-up each). Only the family built is imported."""
    code = ("import models\n"
            "from models import build_model\n"
            "build_model({'name': 'mlp', 'hidden': [8]}, {'num_features': 5, 'num_classes': 2})\n"
            "assert 'models.recurrent' not in sys.modules and 'models.cnn' not in sys.modules\n"
            "assert models.registered_models() == ['attention', 'bow', 'cnn', 'gru', 'lstm', "
            "'mlp']\n")
    assert _heavy_loaded_by(f"import sys\n{code}") == ["torch"]


def test_the_dp_path_registers_our_samplers_for_a_model_built_before_opacus_was_loaded():
    """make_private registers models/layers.py's Linear (and our Conv2d, Embedding) samplers:
    without them Opacus would take its functorch fallback for the attention model's layers."""
    code = """
import sys, torch
from torch.utils.data import DataLoader, TensorDataset
from models import build_model
from models.layers import Linear
model = build_model({'name': 'attention', 'd_model': 8, 'num_heads': 2, 'num_layers': 1,
                     'ff_dim': 8}, {'vocab_buckets': 64, 'max_len': 6, 'num_classes': 2})
assert 'opacus' not in sys.modules
from client.training import DPConfig, make_private
loader = DataLoader(TensorDataset(torch.randint(1, 64, (4, 6, 2)), torch.ones(4, 6, dtype=bool),
                                  torch.tensor([0, 1, 0, 1])), batch_size=2)
hooks, *_ = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                         torch.nn.CrossEntropyLoss(), DPConfig(1.0, 1.0), seed=0, device='cpu')
from opacus.grad_sample.linear import compute_linear_grad_sample
from models.dp_conv import conv2d_grad_sample
assert hooks.GRAD_SAMPLERS[Linear] is compute_linear_grad_sample
assert hooks.GRAD_SAMPLERS[torch.nn.Conv2d] is conv2d_grad_sample
hooks.cleanup()
"""
    assert "opacus" in _heavy_loaded_by(code)


def test_the_pooled_evaluation_of_synthetic_sites_costs_nothing_before_its_first_call(tmp_path):
    """Building it writes no site, reads none and imports no scikit-learn: that is ~1 s at 1000
    hospitals, which round 1 no longer waits for (the initial model is scored while round 1's
    sites train, server/rounds.py). Its first call writes and reads the pool, once."""
    code = """
import sys, torch
from flwr.app import ArrayRecord
from models import build_model
from server.settings import compose
from simulations.global_evaluation import pooled_test_evaluation
from simulations.sites import lazy_synthetic_sites
cfg = compose(["task=tabular", "num_hospitals=3", "data.cache_dir=CACHE"])
lazy = lazy_synthetic_sites(cfg)
prepared = []
evaluate_global = pooled_test_evaluation(
    cfg, lazy.folders(), prepare=lambda site: prepared.append(site) or lazy.ensure(site))
assert prepared == [] and evaluate_global.sites == list(lazy.folders()), prepared
assert not any(folder.exists() for folder in lazy.folders().values())
assert "sklearn" not in sys.modules and "simulations.synthetic" not in sys.modules
arrays = ArrayRecord(build_model(cfg["model"], cfg["task"]["spec"]).state_dict())
metrics = evaluate_global(0, arrays)
assert 0.0 <= metrics["auroc"] <= 1.0, metrics
assert prepared == evaluate_global.sites, prepared
assert evaluate_global(1, arrays) == metrics and len(prepared) == 3
""".replace("CACHE", str(tmp_path))
    assert "sklearn" in _heavy_loaded_by(code)


def test_the_synthetic_generators_load_no_scipy_until_an_image_is_written():
    """Every Ray worker that writes a site imports the generators (one module imports them
    all): the image generator's SciPy blur is imported when images are written, not before."""
    assert "scipy" not in _heavy_loaded_by("import simulations.synthetic")
