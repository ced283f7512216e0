"""The online loop's prompt source (diffalign/eval/prompt_stream.py): deterministic and stateless per epoch, every
prompt of a finite pool visited before any repeats, excluded (evaluation) prompts never given, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from diffalign.errors import ConfigError
from diffalign.eval.prompt_stream import (
    GRAMMAR_SOURCE,
    PromptStream,
    eval_prompt_set,
    grammar_captions,
    grammar_prompts,
    num_grammar_captions,
)
from diffalign.sandbox import SANDBOX_DATA
from diffalign.sandbox.captions import parse_caption


@pytest.fixture
def ten_prompts(tmp_path):
    path = tmp_path / "ten.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(10)))
    return path


def walk(stream: PromptStream, epochs: int, n: int) -> list[list[str]]:
    return [stream.epoch_prompts(e, n) for e in range(epochs)]


# ---------------------------------------------------------------------------------------------------------------
# The grammar


def test_grammar_has_30240_distinct_captions_all_in_the_grammar():
    captions = grammar_captions()
    # 4 prefixes x 5 shapes x 7 colours (6 or none) x 3 sizes x 6 positions x 6 backgrounds x 2 outlines
    assert num_grammar_captions() == len(set(captions)) == 4 * 5 * 7 * 3 * 6 * 6 * 2 == 30240
    for c in captions[::97]:
        parse_caption(c)  # raises when not in the grammar


def test_grammar_prompts_are_distinct_seeded_and_a_larger_pool_extends_a_smaller_one():
    a = grammar_prompts(500, seed=0)
    assert len(set(a)) == 500
    assert a == grammar_prompts(500, seed=0)
    assert a != grammar_prompts(500, seed=1)
    assert grammar_prompts(800, seed=0)[:500] == a
    excluded = grammar_prompts(500, seed=0, exclude=a[:100])
    assert excluded[:400] == a[100:] and not set(excluded) & set(a[:100])  # exclude only removes
    # the world's distribution: most captions name a colour, few ask for an outline
    assert sum(parse_caption(c).color is not None for c in a) > 0.75 * len(a)
    assert sum(bool(parse_caption(c).outline) for c in a) < 0.35 * len(a)


def test_the_whole_grammar_can_be_a_pool():
    everything = grammar_prompts(num_grammar_captions(), seed=3)
    assert set(everything) == set(grammar_captions())


def test_grammar_pool_of_10000_is_fast_and_disjoint_from_the_eval_prompts():
    t0 = time.perf_counter()
    held_out = eval_prompt_set(GRAMMAR_SOURCE, 1000)
    stream = PromptStream(GRAMMAR_SOURCE, pool_size=10_000, exclude=held_out)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"a grammar pool of 10,000 took {elapsed:.1f}s"
    assert stream.num_prompts == len(set(stream.pool)) == 10_000
    assert len(set(held_out)) == 1000
    assert set(stream.pool).isdisjoint(held_out)
    seen = [p for e in range(30) for p in stream.epoch_prompts(e, 64)]
    assert not set(seen) & set(held_out)
    # eval and train pools use different seed derivations: not the same captions first
    assert held_out[:50] != grammar_prompts(50, seed=0)
    assert "excluded 1000 of 1000 given" in stream.describe()
    assert "10000" in stream.describe() and "30240" in stream.describe()


def test_grammar_validation_prompts_are_the_next_n_of_the_eval_order_and_disjoint_from_the_test_ones():
    test = eval_prompt_set(GRAMMAR_SOURCE, 400)
    validation = eval_prompt_set(GRAMMAR_SOURCE, 400, split="validation_unique")
    both = grammar_prompts(800, seed=0, purpose="eval")
    assert test == both[:400] == grammar_prompts(400, seed=0, purpose="eval")  # the test set is unchanged
    assert validation == both[400:]
    assert len(set(validation)) == 400 and set(validation).isdisjoint(test)
    # training that evaluates on the validation prompts never draws them
    stream = PromptStream(GRAMMAR_SOURCE, pool_size=5_000, exclude=validation)
    assert set(stream.pool).isdisjoint(validation)
    with pytest.raises(
        ConfigError, match="test_unique, validation_unique, got eval_split 'validation'"
    ) as err:
        eval_prompt_set(GRAMMAR_SOURCE, 10, split="validation")
    assert "\n" not in str(err.value)


def test_unbounded_grammar_is_deterministic_stateless_and_never_gives_an_excluded_caption():
    held_out = eval_prompt_set(GRAMMAR_SOURCE, 300, seed=5)
    stream = PromptStream(GRAMMAR_SOURCE, seed=5, exclude=held_out)
    assert stream.num_prompts is None and stream.pool is None
    epochs = walk(stream, 150, 16)
    assert all(len(e) == 16 for e in epochs)
    assert not {p for e in epochs for p in e} & set(held_out)
    assert PromptStream(GRAMMAR_SOURCE, seed=5, exclude=held_out).epoch_prompts(7, 16) == epochs[7]
    assert PromptStream(GRAMMAR_SOURCE, seed=6).epoch_prompts(7, 16) != epochs[7]
    assert epochs[0] != epochs[1]
    # unbounded: many more distinct prompts over the epochs than in any one epoch
    assert len({p for e in epochs for p in e}) > 1000
    assert "unbounded" in stream.describe() and "excluded 300 of 300 given" in stream.describe()


def test_grammar_errors_say_how_many_captions_exist():
    with pytest.raises(ConfigError, match="30240 distinct captions") as err:
        PromptStream(GRAMMAR_SOURCE, pool_size=30_241)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="30240 distinct captions"):
        PromptStream(GRAMMAR_SOURCE, pool_size=30_240, exclude=["a red circle"])
    with pytest.raises(ConfigError, match="every caption of the grammar is excluded"):
        PromptStream(GRAMMAR_SOURCE, exclude=grammar_captions())
    with pytest.raises(ConfigError, match="need a number"):
        eval_prompt_set(GRAMMAR_SOURCE, None)
    with pytest.raises(ConfigError, match="seed"):
        PromptStream(GRAMMAR_SOURCE, seed=-1)
    with pytest.raises(ConfigError, match="pool_size"):
        PromptStream(GRAMMAR_SOURCE, pool_size=0)


# ---------------------------------------------------------------------------------------------------------------
# The walk over a finite pool


def test_a_pool_of_10_with_4_per_epoch_visits_all_10_before_repeating(ten_prompts):
    stream = PromptStream(str(ten_prompts), seed=11)
    assert stream.num_prompts == 10
    flat = [p for e in walk(stream, 10, 4) for p in e]  # 40 prompts = 4 full passes
    for k in range(4):
        assert sorted(flat[10 * k : 10 * (k + 1)]) == sorted(stream.pool), f"pass {k} is not a permutation"
    assert flat[:10] != flat[10:20]  # each pass its own order
    # n larger than the pool: one epoch spans passes, still each pass complete
    big = PromptStream(str(ten_prompts), seed=11).epoch_prompts(1, 25)  # positions 25..49
    assert big == (flat + [p for e in walk(stream, 13, 4)[10:] for p in e])[25:50]
    assert sorted(big[5:15]) == sorted(stream.pool)


def test_epochs_are_deterministic_and_stateless(ten_prompts):
    a = PromptStream(str(ten_prompts), seed=2)
    iterated = walk(a, 8, 4)
    alone = PromptStream(str(ten_prompts), seed=2).epoch_prompts(7, 4)
    assert alone == iterated[7]
    assert a.epoch_prompts(3, 4) == iterated[3]  # asking again, out of order, gives the same
    assert walk(PromptStream(str(ten_prompts), seed=2), 8, 4) == iterated
    assert walk(PromptStream(str(ten_prompts), seed=3), 8, 4) != iterated
    g = PromptStream(GRAMMAR_SOURCE, seed=2, pool_size=300)
    g_iterated = walk(g, 8, 64)
    assert PromptStream(GRAMMAR_SOURCE, seed=2, pool_size=300).epoch_prompts(7, 64) == g_iterated[7]
    assert PromptStream(GRAMMAR_SOURCE, seed=4, pool_size=300).epoch_prompts(7, 64) != g_iterated[7]


def test_a_large_epoch_index_is_computed_directly(ten_prompts):
    stream = PromptStream(GRAMMAR_SOURCE, pool_size=1000)
    t0 = time.perf_counter()
    late = stream.epoch_prompts(10**9, 16)
    assert time.perf_counter() - t0 < 1.0 and len(late) == 16 and set(late) <= set(stream.pool)


# ---------------------------------------------------------------------------------------------------------------
# File and dataset sources


def test_txt_file_drops_and_counts_blanks_and_repeats(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog  \na cat\n   \na bird\na dog\n")
    stream = PromptStream(str(path), exclude=["a bird", "not in the file"])
    assert stream.pool == ("a cat", "a dog")
    assert stream.dropped == {"empty": 2, "duplicate": 2}
    assert stream.excluded == 1
    text = stream.describe()
    assert "\n" not in text
    assert "prompts.txt" in text and "pool of 2 prompts" in text
    assert "dropped 2 empty" in text and "dropped 2 duplicate" in text and "excluded 1 of 2 given" in text
    assert eval_prompt_set(str(path), 2) == ["a cat", "a dog"]


def test_partiprompts(shared_data):
    path = shared_data / "PartiPrompts.tsv"
    if not path.is_file():
        pytest.skip(f"PartiPrompts.tsv not found in {shared_data}")
    held_out = eval_prompt_set(str(path), 100)
    assert len(held_out) == len(set(held_out)) == 100
    stream = PromptStream(str(path), seed=1, exclude=held_out)
    assert stream.num_prompts == 1632 - 100 and stream.excluded == 100
    seen = {p for e in walk(stream, 20, 82) for p in e}  # 1640 >= 1532: the whole pool
    assert seen == set(stream.pool) and not seen & set(held_out)
    assert "PartiPrompts.tsv" in stream.describe() and "excluded 100 of 100 given" in stream.describe()
    capped = PromptStream(str(path), pool_size=200)
    assert capped.num_prompts == 200 and "first 200 of 1632" in capped.describe()
    assert PromptStream(str(path), pool_size=10_000).num_prompts == 1632  # more than the source: all of it


def test_hps_json_directory(tmp_path):
    (tmp_path / "anime.json").write_text(json.dumps(["a fox", "a fox", "a cat"]))
    (tmp_path / "photo.json").write_text(json.dumps(["a tree"]))
    stream = PromptStream(str(tmp_path))
    assert sorted(stream.pool) == ["a cat", "a fox", "a tree"]
    assert stream.dropped == {"duplicate": 1}


def test_sandbox_splits_train_pool_and_eval_prompts():
    if not (SANDBOX_DATA / "data").is_dir():
        pytest.skip(f"the sandbox preference data {SANDBOX_DATA} is not built")
    held_out = eval_prompt_set("sandbox", 100, split="test_unique")
    assert len(held_out) == 100
    stream = PromptStream("sandbox", split="train", exclude=held_out)
    assert stream.num_prompts > 100 and not set(stream.pool) & set(held_out)
    assert "sandbox:train" in stream.describe()
    again = PromptStream("sandbox", split="train", exclude=held_out)
    assert again.epoch_prompts(3, 8) == stream.epoch_prompts(3, 8)
    with pytest.raises(ConfigError, match="split 'no_such_split'") as err:
        PromptStream("sandbox", split="no_such_split")
    assert "\n" not in str(err.value)


def test_parquet_directory_with_an_empty_split_is_a_one_line_error(tmp_path):
    from test_data_pickapic import make_row

    from diffalign.data import write_pickapic_dataset

    rows = [make_row(i, caption=f"prompt {i % 3}") for i in range(5)]
    data = tmp_path / "ds"
    write_pickapic_dataset({"train": rows, "validation": []}, data)
    assert sorted(PromptStream(str(data)).pool) == ["prompt 0", "prompt 1", "prompt 2"]
    with pytest.raises(ConfigError, match=rf"prompt source '{data}' split 'validation'.*no rows") as err:
        eval_prompt_set(str(data), 10, split="validation")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_file_is_a_config_error_naming_it(tmp_path):
    for name in ("missing.txt", "missing.tsv", "missing.json", "missing_dir"):
        path = tmp_path / name
        with pytest.raises(ConfigError, match="not found") as err:
            PromptStream(str(path))
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        assert "sandbox-grammar" in str(err.value)  # says what else to give
    with pytest.raises(ConfigError, match="missing.txt"):
        eval_prompt_set(str(tmp_path / "missing.txt"), 5)


def test_empty_pool_is_a_config_error_naming_the_source(tmp_path, ten_prompts):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match="no prompts left") as err:
        PromptStream(str(empty))
    assert str(empty) in str(err.value) and "dropped 2 empty" in str(err.value)
    everything = [f"prompt {i}" for i in range(10)]
    with pytest.raises(ConfigError, match="exclude fewer") as err:
        PromptStream(str(ten_prompts), exclude=everything)
    assert str(ten_prompts) in str(err.value) and "excluded 10 of 10 given" in str(err.value)
    with pytest.raises(ConfigError, match="prompts per epoch"):
        PromptStream(str(ten_prompts)).epoch_prompts(0, 0)


# ---------------------------------------------------------------------------------------------------------------
# Import cost


def test_importing_the_module_does_not_import_torch(repo_root):
    code = "import sys, diffalign.eval.prompt_stream; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
