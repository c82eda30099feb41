import pytest

from benchmarks.config import ConfigError, available_suites, load_suite, parse_override


def test_every_shipped_suite_resolves():
    assert {"smoke", "default"} <= set(available_suites())
    for name in available_suites():
        cfg = load_suite(name)
        assert cfg.name == name


@pytest.mark.parametrize(
    "override, key",
    [
        ("sft.stepz=3", "sft.stepz"),  # unknown key
        ("sft.steps=ten", "sft.steps"),  # wrong type
        ("sft.steps=0", "sft.steps"),  # out of range
        ("sft.lr=-1", "sft.lr"),
        ("prefs.samples_per_prompt=1", "prefs.samples_per_prompt"),
        ("prefs.labelling=vote", "prefs.labelling"),
        ("task.target=neutral", "task.target"),
        ("task.corpus.heldout_fraction=0.9", "task.corpus.heldout_fraction"),
        ("task.corpus.task_sources=[austen]", "task.corpus.task_sources"),
        ("base.hidden_size=30", "base.hidden_size"),
        ("device=tpu", "device"),
        ("seed=1.5", "seed"),
        ("prefs.min_gap=true", "prefs.min_gap"),
        ("dpo.optimizer=sgd", "dpo.optimizer"),  # the DPO section is the trainer's DPOConfig: its checks, its keys
        ("dpo.pack_len=100", "dpo.pack_len"),
        ("dpo.truncation_mode=middle", "dpo.truncation_mode"),
        ("dpo.beta=0.3", "dpo.beta"),
        ("dpo.variants=[kto]", "dpo.variants[0]"),
        ("task.name=nope", "task.name"),
        ("arms.nope.x=1", "arms.nope"),
        ("task.judges=[lexico]", "task.judges[0]"),
        ("task.judges=[vader]", "task.judges[0]"),  # the gold reward itself is no second judge
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_suite("smoke", [override])
    assert f"'{key}'" in str(e.value)


def test_missing_required_field(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("seed: 0\ntask: {name: sentiment, corpus: {sources: [fortunes], task_sources: [fortunes]}}\n")
    with pytest.raises(ConfigError, match="'tokenizer'.*required"):
        load_suite(str(p))


def test_unknown_suite_lists_available():
    with pytest.raises(ConfigError, match="available suites"):
        load_suite("nope")


def test_override_parsing_and_application():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=[x, y]") == {"a": ["x", "y"]}
    cfg = load_suite("smoke", ["sft.steps=7", "prefs.min_gap=0.2"])
    assert cfg.sft.steps == 7 and cfg.prefs.min_gap == 0.2
    assert isinstance(load_suite("smoke", ["sft.lr=1"]).sft.lr, float)  # ints are accepted for floats
