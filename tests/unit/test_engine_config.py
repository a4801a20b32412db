"""DeepSpeed config filling, batch checks, schedule, and checkpoint discovery."""

from __future__ import annotations

import json

import pytest
import torch

from dist_kd.train import checkpoint as ckpt
from dist_kd.train.engine import (
    COMPILE_MODES,
    TrainConfig,
    begin_compiled_step,
    build_ds_config,
    build_scheduler,
    check_batch,
    compile_models,
    parameter_groups,
    resolve_precision,
)


@pytest.mark.parametrize("stage", ["zero0", "zero1", "zero2", "zero3", "zero3_offload"])
def test_shipped_configs_fill_batch_and_precision(stage):
    config = build_ds_config(f"ds_configs/{stage}.json", 8, 4, 2, "bf16", 0.5, "deepspeed")
    assert config["train_batch_size"] == 64
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert "torch_autocast" not in config
    # train.bf16_mode=autocast: DeepSpeed's torch_autocast section in place of its bf16 one
    autocast = build_ds_config(f"ds_configs/{stage}.json", 8, 4, 2, "bf16", 0.5, "autocast")
    assert autocast["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert autocast["bf16"] == {"enabled": False} and autocast["fp16"] == {"enabled": False}
    assert {**autocast, "bf16": config["bf16"]} == {**config, "torch_autocast": autocast["torch_autocast"]}
    # auto (the default): autocast at ZeRO-0 only
    assert build_ds_config(f"ds_configs/{stage}.json", 8, 4, 2, "bf16", 0.5) == (
        autocast if stage == "zero0" else config
    )
    for precision in ("fp32", "fp16"):  # the mode is about bf16 students only
        for mode in ("auto", "autocast", "deepspeed"):
            assert "torch_autocast" not in build_ds_config(f"ds_configs/{stage}.json", 8, 4, 2, precision, 0.5, mode)
    # The shipped JSONs hold only what is DeepSpeed's business.
    raw = json.loads(open(f"ds_configs/{stage}.json").read())
    assert not {"train_batch_size", "train_micro_batch_size_per_gpu", "fp16", "bf16", "gradient_clipping"} & set(raw)


def test_disagreeing_json_is_an_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 100}))
    with pytest.raises(ValueError, match="train_batch_size=100"):
        build_ds_config(str(path), 8, 1, 2, "fp32", 1.0)
    path.write_text(json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(ValueError, match="enables fp16"):
        build_ds_config(str(path), 8, 1, 2, "fp32", 1.0)
    # "see ds_configs/" named a folder that an installed package has not in the working directory: the names
    said = r"missing.json does not exist; the shipped ones are ds_configs/zero0.json, ds_configs/zero1.json, "
    with pytest.raises(FileNotFoundError, match=said + r".*ds_configs/zero3_offload.json, or give a path"):
        build_ds_config(str(tmp_path / "missing.json"), 8, 1, 2, "fp32", 1.0)
    path.write_text(json.dumps({"torch_autocast": {"enabled": True}}))
    with pytest.raises(ValueError, match=r"ds.json sets 'torch_autocast'.*train.bf16_mode"):
        build_ds_config(str(path), 8, 1, 2, "bf16", 1.0)
    with pytest.raises(ValueError, match=r"bf16_mode must be one of \['auto', 'autocast', 'deepspeed'\], got 'amp'"):
        TrainConfig(bf16_mode="amp")
    path.write_text(json.dumps({"bf16": {"enabled": True}}))  # a JSON that asks for DeepSpeed's bf16 itself
    assert build_ds_config(str(path), 8, 1, 2, "bf16", 1.0)["bf16"] == {"enabled": True}
    with pytest.raises(ValueError, match=r"ds.json enables bf16 .*but train.bf16_mode=autocast"):
        build_ds_config(str(path), 8, 1, 2, "bf16", 1.0, "autocast")
    path.write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, "scheduler": {"type": "x"}}))
    with pytest.raises(ValueError, match=r"sets 'optimizer' and 'scheduler', which dist_kd does not use.*train.lr"):
        build_ds_config(str(path), 8, 1, 2, "fp32", 1.0)
    # DeepSpeed ignores keys it does not know: a misspelt section ran at ZeRO-0 without a word, and a stage it
    # does not have was a pydantic error naming no file, after the teacher had loaded.
    path.write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    with pytest.raises(ValueError, match=r"'zero_optimisation', which DeepSpeed does not read .*'zero_optimization'"):
        build_ds_config(str(path), 8, 1, 2, "fp32", 1.0)
    for zero, shown in (({"stage": 5}, "stage 5"), ({"stage": True}, "stage True"), (2, "int, not an object")):
        path.write_text(json.dumps({"zero_optimization": zero}))
        with pytest.raises(
            ValueError, match=rf"ds.json: zero_optimization must hold a stage of 0, 1, 2 or 3, got {shown}"
        ):
            build_ds_config(str(path), 8, 1, 2, "fp32", 1.0)
    for stage in ("2", 2.0):  # DeepSpeed reads both as stage 2
        path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
        assert build_ds_config(str(path), 8, 1, 2, "fp32", 1.0)["zero_optimization"]["stage"] == 2
    path.write_text(json.dumps({"a_section_of_a_newer_deepspeed": {}, "wall_clock_breakdown": False}))
    assert build_ds_config(str(path), 8, 1, 2, "fp32", 1.0)["a_section_of_a_newer_deepspeed"] == {}  # close to none


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ({"checkpoint": {"writer": {"type": "python", "decoupled": True}}}, "checkpoint.writer is not supported"),
        ({"checkpoint": {"writer": {"type": "fast"}}}, r"checkpoint.writer .*DeepSpeed's default loader"),
        ({"checkpoint": {"load_universal": True}}, "checkpoint.load_universal is not supported"),
        ({"zero_optimization": {"stage": 1, "elastic_checkpoint": True}}, "zero_optimization.elastic_checkpoint"),
        ({"nebula": {"enabled": True}}, "nebula.enabled is not supported"),
        ({"datastates_ckpt": {"enabled": True}}, "datastates_ckpt is not supported"),
    ],
)
def test_deepspeed_settings_whose_checkpoints_do_not_resume_are_refused(tmp_path, given, said):
    """Each trained and saved; then every resume failed (a decoupled writer's checkpoint was renamed before its
    files were written, a FastPersist one's loaded as "damaged: delete the checkpoints directory"), or crashed
    in DeepSpeed's universal / elastic loaders."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(given))
    with pytest.raises(ValueError, match=rf"^deepspeed.config .*ds.json: {said}.*; remove it$"):
        build_ds_config(str(path), 8, 1, 2, "fp32", 1.0)


def test_deepspeed_checkpoint_settings_that_resume_are_taken(tmp_path):
    """The defaults written out, and the checkpoint settings whose resume equals an uninterrupted run's."""
    path = tmp_path / "ds.json"
    for given in (
        {"checkpoint": {"tag_validation": "FAIL", "use_node_local_storage": True, "load_universal": False}},
        {
            "zero_optimization": {"stage": 1, "elastic_checkpoint": False},
            "checkpoint": {"writer": None},
            "nebula": {"enabled": False},
        },  # what DeepSpeed releases before 0.18 took
    ):
        path.write_text(json.dumps(given))
        config = build_ds_config(str(path), 8, 1, 2, "fp32", 1.0)
        assert config["checkpoint"] == given["checkpoint"]
        assert "nebula" not in config  # disabled: a no-op, which DeepSpeed 0.19+ refuses all the same


def test_a_json_key_that_disagrees_names_the_run_config_key_that_gives_it(tmp_path):
    """Every disagreement was explained as "(micro_batch_size x grad_accum x world size)", a clip one too."""
    path = tmp_path / "ds.json"
    for key, value, ours, given_by in (
        ("gradient_clipping", 0.5, 1.0, "train.clip"),
        ("train_micro_batch_size_per_gpu", 4, 8, "data.micro_batch_size"),
        ("gradient_accumulation_steps", 2, 1, "train.grad_accum"),
        ("train_batch_size", 100, 16, "data.micro_batch_size x train.grad_accum x world size"),
    ):
        path.write_text(json.dumps({key: value}))
        with pytest.raises(ValueError) as err:
            build_ds_config(str(path), 8, 1, 2, "fp32", 1.0)
        said = f"sets {key}={value}, but the run config gives {ours} ({given_by}); remove the key from the JSON"
        assert str(err.value).endswith(said), key


def test_a_hugging_face_style_json_of_auto_values_is_filled_and_a_string_number_is_said_as_one(tmp_path):
    """ "auto" (written for the HF Trainer, which fills it in) was read as True in fp16/bf16 ("enables fp16") and
    refused at the top level; "32", a string, was said as "sets train_batch_size=32, but the run config gives 32"."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "overlap_comm": True},
    }))  # fmt: skip
    ds = build_ds_config(str(path), 8, 2, 2, "fp32", 1.0)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        32, 8, 2)  # fmt: skip
    assert ds["gradient_clipping"] == 1.0 and ds["fp16"]["enabled"] is False and ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # DeepSpeed's default bucket
    path.write_text(json.dumps({"train_batch_size": "32"}))
    with pytest.raises(ValueError, match=r'sets train_batch_size="32", but the run config gives 32 \('):
        build_ds_config(str(path), 8, 2, 2, "fp32", 1.0)


def test_deepspeeds_older_bfloat16_section_is_read_as_bf16_and_a_section_not_an_object_is_refused(tmp_path):
    """DeepSpeed reads "bfloat16" where "bf16" is absent; dist_kd wrote "bf16" beside it, so the JSON's
    request was dropped (an fp32 run with it passed, and auto mode took autocast for it). "bf16": true crashed
    with an AttributeError traceback."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bfloat16": {"enabled": True}}))
    with pytest.raises(ValueError, match=r"ds.json enables bf16, but train.precision resolves to fp32"):
        build_ds_config(str(path), 8, 1, 2, "fp32", 1.0)
    config = build_ds_config(str(path), 8, 1, 2, "bf16", 1.0)  # auto at ZeRO-0: DeepSpeed's bf16, as the JSON asks
    assert config["bf16"] == {"enabled": True} and "bfloat16" not in config and "torch_autocast" not in config
    path.write_text(json.dumps({"bfloat16": {"enabled": True}, "bf16": {"enabled": False}}))  # bf16's, as DeepSpeed
    config = build_ds_config(str(path), 8, 1, 2, "fp32", 1.0)
    assert config["bf16"] == {"enabled": False} and "bfloat16" not in config
    for key in ("fp16", "bf16", "bfloat16"):
        path.write_text(json.dumps({key: True}))
        with pytest.raises(
            ValueError, match=rf'ds.json: {key} must be an object such as {{"enabled": true}}, got true'
        ):
            build_ds_config(str(path), 8, 1, 2, "fp32", 1.0)


def test_the_jsons_own_precision_settings_are_kept(tmp_path):
    """Only "enabled" is the run config's: a static fp16 loss_scale became dynamic (0), the loss scaler's other
    settings and bf16's immediate_grad_update were dropped, without a word."""
    path = tmp_path / "ds.json"
    scaler = {"enabled": True, "loss_scale": 128, "initial_scale_power": 8, "loss_scale_window": 500, "hysteresis": 4}
    path.write_text(json.dumps({"fp16": scaler}))
    assert build_ds_config(str(path), 8, 1, 2, "fp16", 1.0)["fp16"] == scaler
    path.write_text(json.dumps({"fp16": {"loss_scale_window": 200}}))  # the rest as dist_kd sets it
    assert build_ds_config(str(path), 8, 1, 2, "fp16", 1.0)["fp16"] == {
        "enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 200,
    }  # fmt: skip
    path.write_text(json.dumps({"bf16": {"enabled": True, "immediate_grad_update": False}}))
    config = build_ds_config(str(path), 8, 1, 2, "bf16", 1.0, "deepspeed")
    assert config["bf16"] == {"enabled": True, "immediate_grad_update": False} and config["fp16"] == {"enabled": False}


@pytest.mark.parametrize(
    "section, said",
    [
        ({"zero_optimization": {"stage": 2, "overlap_comms": True}},
         r"zero_optimization.overlap_comms is not a setting DeepSpeed knows there \(misspelt\?\)$"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}},
         r"zero_optimization.offload_param.device: Input should be 'none', 'cpu' or 'nvme'$"),
        ({"fp16": {"loss_scale": "high"}}, r"fp16.loss_scale: fp16.loss_scale must be a number$"),
        ({"amp": {"enabled": True}}, r"DeepSpeed refuses it: NVIDIA Apex AMP integration has been removed"),
    ],
)  # fmt: skip
def test_a_section_deepspeed_refuses_is_one_error_naming_the_file_and_key(tmp_path, section, said):
    """Found by deepspeed.initialize, after the teacher had loaded: a pydantic message naming neither file nor
    section (exit 2), or for a section DeepSpeed dropped, a 44-line traceback (exit 1)."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(section))
    with pytest.raises(ValueError, match=rf"^deepspeed.config {path}: {said}"):
        build_ds_config(str(path), 8, 1, 2, "fp16", 1.0)


def test_batch_check_and_precision():
    assert check_batch(8, 2, 4, None) == 64
    with pytest.raises(ValueError, match="global_batch_size=60"):
        check_batch(8, 2, 4, 60)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # DeepSpeed's CPU accelerator trains bf16
    with pytest.raises(ValueError, match="^train.precision=fp16 needs a GPU; use fp32, auto or bf16"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="^--precision fp16 needs a GPU"):  # finetune's flag, as the user wrote it
        resolve_precision("fp16", torch.device("cpu"), "--precision")


@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup", "constant"])
def test_schedules_warm_up_then_follow_their_shape(name):
    """train.scheduler through transformers.get_scheduler: the lr multiplier at each step against the formula."""
    import math

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1.0)
    scheduler = build_scheduler(optimizer, TrainConfig(max_steps=100, lr=1.0, warmup_ratio=0.1, scheduler=name))
    values = []
    for _ in range(100):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    shape = {
        "linear": lambda s: (100 - s) / 90,
        "cosine": lambda s: 0.5 * (1 + math.cos(math.pi * (s - 10) / 90)),
        "constant_with_warmup": lambda s: 1.0,
        "constant": lambda s: 1.0,  # transformers' constant ignored the warmup: 1.0 from the first step
    }[name]
    expected = [s / 10 if s < 10 else shape(s) for s in range(100)]
    assert values == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError, match=r"train.scheduler must be one of \['linear', 'cosine'"):
        TrainConfig(scheduler="cosine_annealing")


def test_adamax_decays_weights_as_adamw_does_decoupled_from_its_update():
    """torch's Adamax adds the decay to the gradient, which its update divides by its own size: a weight without
    a gradient moved about lr towards 0 per step (the student's pooler lost 80 % in 30 steps at lr 1e-3)."""
    from transformers import BertConfig, BertModel

    from dist_kd.train.engine import build_optimizer

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 vocab_size=50))  # fmt: skip
    cfg = TrainConfig(optimizer="adamax", lr=1e-3, weight_decay=0.01, max_steps=10)
    optimizer = build_optimizer(model, cfg)
    reference = torch.optim.Adamax([torch.nn.Parameter(model.encoder.layer[0].output.dense.weight.detach().clone())],
                                   lr=1e-3)  # fmt: skip
    pooler, dense = model.pooler.dense.weight, model.encoder.layer[0].output.dense.weight
    pooler_before, dense_before = pooler.detach().clone(), dense.detach().clone()
    for _ in range(5):
        optimizer.zero_grad()
        reference.zero_grad()
        gradient = torch.randn_like(dense)
        dense.grad, reference.param_groups[0]["params"][0].grad = gradient.clone(), gradient.clone()
        pooler.grad = torch.zeros_like(pooler)  # as DeepSpeed hands a weight no loss reaches: decay alone moves it
        with torch.no_grad():
            reference.param_groups[0]["params"][0].mul_(1 - 1e-3 * 0.01)
        optimizer.step()
        reference.step()
    torch.testing.assert_close(pooler, pooler_before * (1 - 1e-3 * 0.01) ** 5, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(dense, reference.param_groups[0]["params"][0], rtol=0, atol=1e-7)
    assert not torch.equal(dense, dense_before)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]  # kept for the checkpoint
    zero_grad = torch.optim.Adamax([torch.nn.Parameter(torch.ones(3))], lr=1e-3, weight_decay=0.01)
    zero_grad.param_groups[0]["params"][0].grad = torch.zeros(3)
    zero_grad.step()  # what torch's L2 decay does to a weight whose gradient is 0: a step of about lr
    assert float(zero_grad.param_groups[0]["params"][0][0]) == pytest.approx(1 - 1e-3, abs=1e-6)


def test_no_weight_decay_on_bias_and_layernorm():
    from transformers import BertModel

    from dist_kd.testing import tiny_bert_config

    model = BertModel(tiny_bert_config(num_layers=1))
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any("LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    for step in (100, 200):
        (tmp_path / ckpt.step_dir_name(step)).mkdir()
        (tmp_path / ckpt.step_dir_name(step) / "rank00000.pt").write_bytes(b"")
        (tmp_path / ckpt.step_dir_name(step) / "meta.json").write_text("{}")
    (tmp_path / ckpt.step_dir_name(300)).mkdir()  # no meta.json: incomplete
    (tmp_path / ".tmp-step-00000400").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-00000200"
    assert ckpt.latest_checkpoint(tmp_path / "none") is None


def test_resume_compatibility_names_the_difference(tmp_path):
    saved = {"teacher": {"num_layers": 12}, "student": {"hidden_size": 312}, "step": 5}
    ckpt.check_compatible(saved, {"teacher": {"num_layers": 12}, "student": {"hidden_size": 312}}, tmp_path)
    with pytest.raises(ValueError, match="student: checkpoint has .*312.*this run has .*768"):
        ckpt.check_compatible(saved, {"teacher": {"num_layers": 12}, "student": {"hidden_size": 768}}, tmp_path)


def test_negative_seed_is_a_config_error():
    from dist_kd.train.engine import TrainConfig

    with pytest.raises(ValueError, match="train.seed must be >= 0"):
        TrainConfig(seed=-1)


class ScheduledEngine:
    """What a DeepSpeed engine saves and loads of the schedule: optimizer and scheduler state dicts."""

    def __init__(self, cfg: TrainConfig):
        self.optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        self.lr_scheduler = build_scheduler(self.optimizer, cfg)

    def save_checkpoint(self, save_dir, tag, save_latest):
        target = ckpt.Path(save_dir) / tag
        target.mkdir(parents=True, exist_ok=True)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict()}
        torch.save(state, target / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir, tag, load_optimizer_states):
        state = torch.load(ckpt.Path(load_dir) / tag / "mp_rank_00_model_states.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])

    def train(self, steps: int) -> list[float]:
        rates = []
        for _ in range(steps):
            rates.append(self.optimizer.param_groups[0]["lr"])
            self.optimizer.step()
            self.lr_scheduler.step()
        return rates


def test_a_resume_with_a_longer_schedule_takes_the_new_rate_from_its_first_step(tmp_path):
    """Saved at step 10 of 100 (warmup 10: rate 1.0 next), resumed for 200 steps (warmup 20): the first step
    after the resume runs at 10/20 of the peak, as the warning says, not at the checkpoint's 1.0."""
    before = ScheduledEngine(TrainConfig(max_steps=100, lr=1.0, warmup_ratio=0.1))
    before.train(10)
    checkpoint = ckpt.save_checkpoint(before, tmp_path, 10, {"step": 10}, {}, 0)
    assert before.optimizer.param_groups[0]["lr"] == pytest.approx(1.0)

    after = ScheduledEngine(TrainConfig(max_steps=200, lr=1.0, warmup_ratio=0.1))
    ckpt.load_checkpoint(after, checkpoint)
    expected = [s / 20 if s < 20 else (200 - s) / 180 for s in range(10, 30)]  # linear warmup 20, then decay
    assert after.train(20) == pytest.approx(expected, abs=1e-12)

    same = ScheduledEngine(TrainConfig(max_steps=100, lr=1.0, warmup_ratio=0.1))
    ckpt.load_checkpoint(same, checkpoint)  # an unchanged schedule resumes at exactly the rate it saved
    assert same.train(90) == before.train(90)


def test_compile_models_compiles_in_place_and_refuses_zero3():
    """train.compile: each module's forward is compiled in place (the state dict keys stay), nothing without
    the flag, and ZeRO-3 is refused before anything is built on it."""
    models = [torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2))]
    keys = [list(model.state_dict()) for model in models]
    compile_models(models, TrainConfig(), {"zero_optimization": {"stage": 0}})
    assert all(getattr(model, "_compiled_call_impl", None) is None for model in models)
    compile_models(models, TrainConfig(compile=True), {"zero_optimization": {"stage": 2}})
    assert all(model._compiled_call_impl is not None for model in models)
    assert [list(model.state_dict()) for model in models] == keys
    with pytest.raises(ValueError, match="train.compile works with ZeRO 0-2; this run's deepspeed.config is ZeRO-3"):
        compile_models([torch.nn.Linear(2, 2)], TrainConfig(compile=True), {"zero_optimization": {"stage": 3}})


def test_compiled_teacher_and_student_trace_without_graph_breaks(tmp_path):
    """transformers 5 installs its hidden-state hooks at a model's first forward; inside a compiled forward
    that broke the graph 8 times over a teacher and a student. compile_models installs them first."""
    from dist_kd.models.student import StudentConfig, build_student
    from dist_kd.models.teacher import Teacher
    from dist_kd.testing import build_tiny_bert

    path = build_tiny_bert(tmp_path / "t", num_layers=2)
    teacher = Teacher(path, dtype="fp32", score_layers=[1, 2])  # never run before it is compiled
    student = build_student(StudentConfig(num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32),
                            teacher.model.config)  # fmt: skip
    ids, mask = torch.randint(5, 50, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:
        compile_models([student, teacher.model], TrainConfig(compile=True), {"zero_optimization": {"stage": 0}})
        for _ in range(2):
            compiled = teacher.features(ids, mask)
            student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 2  # one per model: not traced again on the second step
    finally:
        torch._dynamo.reset()
    eager = Teacher(path, dtype="fp32", score_layers=[1, 2]).features(ids, mask)  # a second, eager copy
    for layer in (1, 2):
        torch.testing.assert_close(compiled.hidden[layer], eager.hidden[layer], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled.scores[layer], eager.scores[layer], rtol=1e-4, atol=1e-5)


def test_compile_mode_reaches_torch_compile_and_cuda_graph_modes_mark_each_step(monkeypatch):
    calls, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    for mode in COMPILE_MODES:
        train = TrainConfig(compile=True, compile_mode=mode)
        compile_models([torch.nn.Linear(2, 2)], train, {"zero_optimization": {"stage": 0}})
        begin_compiled_step(train)
        begin_compiled_step(TrainConfig(compile=False, compile_mode=mode))  # not compiled: nothing to mark
    assert [kwargs["mode"] for kwargs in calls] == list(COMPILE_MODES)
    assert len(marks) == 2  # reduce-overhead and max-autotune replay CUDA graphs; the other two do not
    with pytest.raises(ValueError, match="train.compile_mode must be one of .*'reduce-overhead'.*, got 'fast'"):
        TrainConfig(compile=True, compile_mode="fast")
    # Accumulated gradients would be overwritten by the next micro-batch's replay: refused with the fix named.
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match=f"train.compile_mode={mode} .*train.grad_accum=2.*grad_accum=1"):
            TrainConfig(compile=True, compile_mode=mode, grad_accum=2)
    TrainConfig(compile=True, compile_mode="max-autotune-no-cudagraphs", grad_accum=2)
    TrainConfig(compile=False, compile_mode="reduce-overhead", grad_accum=2)  # not compiled: nothing replays


def test_a_constant_run_of_the_release_before_resumed_mid_warmup_is_told_its_schedule_changed(caplog, tmp_path):
    """transformers' constant ignored the warmup, so constant runs took their full rate from step 1; resumed
    under the warmup they now get, their rate fell mid-run without a word (both records said "constant")."""
    from dist_kd.train.checkpoint import check_schedule, settings_meta

    meta = settings_meta(TrainConfig(scheduler="constant", warmup_ratio=0.5, max_steps=4), {}, 4)
    assert meta["schedule"]["scheduler"] == "constant_with_warmup"
    no_warmup = settings_meta(TrainConfig(scheduler="constant", warmup_ratio=0.0, max_steps=4), {}, 4)
    assert no_warmup["schedule"]["scheduler"] == "constant"
    saved = {"step": 1, "schedule": {"max_steps": 4, "warmup_ratio": 0.5, "scheduler": "constant"}}  # before
    with caplog.at_level("WARNING"):
        check_schedule(saved, meta, tmp_path / "step-00000001")
    assert "with another schedule (scheduler constant -> constant_with_warmup)" in caplog.text
