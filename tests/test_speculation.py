"""Prompt-lookup speculation (elmd/engine/speculation.py, Scheduler._decode): the output
is exactly plain decoding's, token for token, logprob for logprob, seeded samples and
finish reasons included, while proposals are really accepted.

Two real checkpoints: the tiny random one, whose greedy reply to a repetitive prompt falls
into a loop the lookup predicts, and a scripted one (tests/scripted_checkpoint.py) whose
reply is copied from the prompt, sampled at a temperature where about one token in twenty
leaves the script, so the seeded generator's every draw matters.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
from openai import OpenAI

from elmd.engine.load import load_engine
from elmd.engine.protocol import SamplingParams
from elmd.engine.speculation import FIRST_PROPOSAL, MAX_PROPOSAL, Acceptance, PassCosts, PromptLookup
from elmd.fixtures import write_checkpoint
from scripted_checkpoint import write_scripted_checkpoint
from test_metrics import scrape, value

REPLY = "Alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec romeo."
LOOPING_PROMPT = [5, 6, 7, 8, 9, 10] * 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=1)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    return write_scripted_checkpoint(tmp_path_factory.mktemp("scripted"), REPLY)


@contextmanager
def engines(checkpoint):
    """The same checkpoint with speculation on and off."""
    on = load_engine(checkpoint, backend="torch", dtype="float32", slots=2, speculation=True)
    off = load_engine(checkpoint, backend="torch", dtype="float32", slots=2, speculation=False)
    try:
        yield on, off
    finally:
        on.close()
        off.close()


@pytest.fixture(scope="module")
def tiny_engines(tiny):
    with engines(tiny) as pair:
        yield pair


@pytest.fixture(scope="module")
def scripted_engines(scripted):
    with engines(scripted) as pair:
        yield pair


def run(engine, prompt_ids: list[int], params: SamplingParams):
    """Every step the backend reports, and how it finished."""
    channel = engine.backend.submit(prompt_ids, params, engine.tokenizer.eos_ids)
    return list(channel), channel.finished


def assert_same(a, b) -> None:
    """The same tokens and finish; logprobs equal up to float rounding (a verifying pass
    multiplies several positions at once, which sums in another order than one)."""
    (steps_a, finished_a), (steps_b, finished_b) = a, b
    assert [s.token_id for s in steps_a] == [s.token_id for s in steps_b]
    assert finished_a == finished_b
    for x, y in zip(steps_a, steps_b):
        if x.logprob is None or y.logprob is None:
            assert x.logprob is y.logprob
            continue
        assert x.logprob.logprob == pytest.approx(y.logprob.logprob, abs=1e-4)
        assert [i for i, _ in x.logprob.top] == [i for i, _ in y.logprob.top]
        assert [v for _, v in x.logprob.top] == pytest.approx([v for _, v in y.logprob.top], abs=1e-4)


def accepted(engine) -> int:
    return engine.backend.scheduler.accepted_tokens


# -- the lookup ----------------------------------------------------------------------


def test_lookup_copies_what_followed_the_longest_latest_match():
    def propose(tokens, room=MAX_PROPOSAL):
        lookup = PromptLookup()
        lookup.length = MAX_PROPOSAL
        return lookup.propose(tokens, room)

    assert propose([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 3], room=3) == [5, 6, 7]  # "3": the latest match wins
    assert propose([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3]) == [5, 6, 7, 2, 3]  # "2 3" (no earlier "7 2 3")
    assert propose([1, 2, 3, 4, 5, 2, 3, 9, 1, 2, 3]) == [4, 5, 2, 3, 9, 1, 2, 3]  # "1 2 3" beats the later "2 3"
    assert propose([1, 2, 3, 8]) == []  # 8 never occurred before


def test_lookup_length_starts_at_zero_and_follows_acceptance():
    lookup = PromptLookup()
    tokens = [1, 2, 3, 1, 2]
    assert lookup.propose(tokens, room=8) == []  # length 0: no pass spent on a guess yet
    assert lookup.guess[0] == 3
    lookup.record([], 0, sampled=3)  # right once
    lookup.record([], 0, sampled=4)  # then wrong: the run starts over
    lookup.record([], 0, sampled=3)
    assert lookup.length == 0
    lookup.record([], 0, sampled=3)  # right twice in a row: guesses are verified from now on
    assert lookup.length == FIRST_PROPOSAL
    assert lookup.propose(tokens, room=2) == [3, 1]  # never past the room left
    lookup.record([3, 1, 2, 3], 4, sampled=3)
    assert lookup.length == min(2 * FIRST_PROPOSAL, MAX_PROPOSAL)  # doubles after a full accept
    lookup.record([3, 1, 2, 3], 2, sampled=3)
    assert lookup.length == min(2 * FIRST_PROPOSAL, MAX_PROPOSAL)  # stays after a partial one
    lookup.record([3, 1, 2, 3], 0, sampled=7)
    assert lookup.length == 0  # none accepted: back to plain steps


def test_acceptance_is_kept_tokens_over_kept_tokens_and_misses():
    acceptance = Acceptance()
    assert acceptance.rate == 0.5  # one of each to begin with
    acceptance.record([4, 5, 6, 7], 2)  # two kept, then a miss
    acceptance.record([8, 9], 2)  # kept whole: no miss
    acceptance.record([], 0)  # a plain step says nothing
    assert acceptance.rate == (1 + 4) / (1 + 4 + 1 + 1)


def test_a_guess_is_cut_to_what_its_rows_are_worth():
    costs = PassCosts()
    assert costs.worth(1, 1, 8, 0.5) == 8  # nothing measured yet: all of it
    costs.record(1, 0.010), costs.record(1, 0.010), costs.record(9, 1.0)
    assert costs.worth(1, 1, 8, 0.5) == 8  # no count measured often enough to trust
    for rows in (1, 9, 9, 9):  # memory-bound: nine rows cost 1.2x one (the one slow pass was noise)
        costs.record(rows, 0.010 if rows == 1 else 0.012)
    assert costs.estimate(5) == pytest.approx(0.011)  # interpolated
    assert costs.estimate(20) == pytest.approx(0.012)  # past the widest measured: its cost
    assert costs.worth(1, 1, 8, 0.9) == 8  # alone, likely kept: all eight
    assert costs.worth(1, 1, 8, 0.1) == 1  # rarely kept: one token (0.1 kept for 2.5% more time)
    assert costs.worth(1, 1, 8, 0.02) == 0  # hardly ever: 0.02 tokens for 2.5% more time, not worth it
    costs = PassCosts()
    for rows in [*range(1, 41)] * PassCosts.TRUSTED:  # memory-bound up to 4 rows, then each row costs its share
        costs.record(rows, 0.0025 * max(rows, 4))
    assert costs.worth(4, 4, 8, 0.5) == 0  # four sequences would lose more than a guess gains
    assert costs.worth(4, 4, 8, 0.95) == 0
    assert costs.worth(1, 1, 8, 0.9) == 8  # alone: three rows are free, and the rest cost a token each, kept 0.9^k
    assert costs.worth(1, 1, 8, 0.5) == 3  # the free rows only
    for _ in range(PassCosts.STALE):  # plain steps only, for a while
        costs.record(1, 0.0025 * 4)
    assert costs.worth(4, 4, 8, 0.5) == 8  # the wide passes' costs are forgotten: tried again


# -- exactness on the engine ---------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 37])
def test_greedy_output_is_the_same_with_and_without_and_proposals_are_accepted(tiny_engines, max_tokens):
    on, off = tiny_engines
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=3)
    before = accepted(on)
    with_, finished = run(on, LOOPING_PROMPT, params)
    assert_same((with_, finished), run(off, LOOPING_PROMPT, params))
    assert len(with_) == max_tokens and finished.reason == "length"
    if max_tokens > 10:
        assert accepted(on) > before  # some tokens came from accepted proposals


def test_unrelated_greedy_output_is_the_same(tiny_engines):
    on, off = tiny_engines
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for prompt in ([11, 500, 23, 901, 77], list(range(100, 160))):
        assert_same(run(on, prompt, params), run(off, prompt, params))


def test_the_context_limit_ends_at_the_same_token(tiny_engines):
    on, off = tiny_engines
    context = on.context_length
    prompt = (LOOPING_PROMPT * context)[: context - 20]
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    before = accepted(on)
    steps, finished = run(on, prompt, params)
    assert_same((steps, finished), run(off, prompt, params))
    assert len(prompt) + len(steps) == context and finished.reason == "length"
    assert accepted(on) > before


def test_seeded_samples_logprobs_penalties_and_eos_are_the_same(scripted_engines):
    on, off = scripted_engines
    prompt = on.tokenizer.encode_chat([{"role": "user", "content": f"Repeat after me: {REPLY}"}])
    before, left_script, eos = accepted(on), 0, 0
    for seed in range(8):
        params = SamplingParams(max_tokens=40, temperature=5.0, seed=seed, logprobs=2, presence_penalty=0.3)
        with_, finished = run(on, prompt, params)
        assert_same((with_, finished), run(off, prompt, params))
        text = on.tokenizer.decode([s.token_id for s in with_])
        left_script += not REPLY.startswith(text.strip())
        eos += finished.reason == "eos"
    assert accepted(on) - before >= 8 * 5  # proposals copied from the prompt were accepted
    assert left_script and eos  # some samples left the script (randomness mattered), some ended at EOS


def test_cancelling_mid_reply_stops_it_and_the_engine_goes_on(tiny_engines):
    on, off = tiny_engines
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    channel = on.backend.submit(LOOPING_PROMPT, params, on.tokenizer.eos_ids)
    received = []
    for step in channel:
        received.append(step.token_id)
        if len(received) == 3:
            channel.cancel()
    assert channel.finished.reason == "cancelled"
    assert len(received) < params.max_tokens
    again = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    assert_same(run(on, LOOPING_PROMPT, again), run(off, LOOPING_PROMPT, again))


def test_batched_sequences_verify_their_guesses_in_one_pass_and_stay_exact(tiny_engines):
    """Two looping prompts decoding at once: their steps carry both sequences' guesses in
    one pass (rows of two slots, more rows than sequences), and each reply is its reply alone."""
    on, off = tiny_engines
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    prompts = [LOOPING_PROMPT, [40, 41, 42] * 5, [7, 8] * 9]
    alone = [run(off, p, params) for p in prompts]
    together = [None] * len(prompts)
    scheduler = on.backend.scheduler
    runner, passes, pass_costs = scheduler.runner, [], scheduler.pass_costs
    scheduler.pass_costs = None  # guesses uncut: how they are cut is timing (PassCosts' own tests)

    def recording_runner(tokens, positions, slots, *args, **kwargs):
        passes.append(slots.tolist())
        return runner(tokens, positions, slots, *args, **kwargs)

    def one(i):
        together[i] = run(on, prompts[i], params)

    scheduler.runner = recording_runner
    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        scheduler.runner, scheduler.pass_costs = runner, pass_costs
    for a, b in zip(together, alone):
        assert_same(a, b)
    assert any(len(set(slots)) >= 2 and len(slots) > len(set(slots)) for slots in passes)


# -- through the API -----------------------------------------------------------------


def test_streamed_chat_is_the_same_with_the_setting_off(start_server, scripted):
    question = [{"role": "user", "content": f"Repeat after me: {REPLY}"}]
    replies = []
    for speculation in (True, False):
        running = start_server(scripted, speculation=speculation, keep_alive=-1)
        client = OpenAI(base_url=running.v1, api_key="unused")
        stream = client.chat.completions.create(model="tiny-openelm", messages=question, temperature=2.0, seed=5,
                                                max_tokens=30, stream=True, logprobs=True, top_logprobs=2)
        chunks = [c for c in stream if c.choices]
        replies.append(("".join(c.choices[0].delta.content or "" for c in chunks),
                        [lp.model_dump() for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.content],
                        chunks[-1].choices[0].finish_reason))
        engine = running.manager.loaded()["tiny-openelm"]
        assert engine.backend.scheduler.speculation is speculation
        assert (engine.backend.scheduler.accepted_tokens > 0) is speculation
        samples = scrape(running.base_url)  # /metrics reports what the scheduler counted
        proposed = value(samples, "elmd_speculative_tokens_proposed_total", model="tiny-openelm")
        accepted = value(samples, "elmd_speculative_tokens_accepted_total", model="tiny-openelm")
        assert (proposed, accepted) == (engine.backend.scheduler.proposed_tokens, engine.backend.scheduler.accepted_tokens)
        assert (accepted > 0) is speculation and proposed >= accepted
    assert replies[0][0] == replies[1][0] and replies[0][2] == replies[1][2]
    assert [lp["token"] for lp in replies[0][1]] == [lp["token"] for lp in replies[1][1]]
    assert replies[0][0].startswith("Alpha bravo charlie")


# -- a draft model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory):
    """Another tiny checkpoint (other random weights, the same tokenizer): a draft that
    guesses badly."""
    return write_checkpoint(tmp_path_factory.mktemp("other"), "tiny", seed=2)


@contextmanager
def drafted(checkpoint, draft):
    engine = load_engine(checkpoint, backend="torch", dtype="float32", slots=2, draft_dir=draft)
    try:
        yield engine
    finally:
        engine.close()


def test_a_copy_of_the_target_as_draft_has_every_guess_accepted_and_changes_nothing(tiny, tiny_engines):
    """The mechanism's ceiling: a draft that is the target guesses what greedy picks."""
    _, off = tiny_engines
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, logprobs=3)
    prompts = ([11, 500, 23, 901, 77], list(range(100, 160)))
    with drafted(tiny, tiny) as engine:
        assert engine.backend.info.extra["draft"] == tiny.name
        for prompt in prompts:
            assert_same(run(engine, prompt, params), run(off, prompt, params))
        scheduler = engine.backend.scheduler
        assert scheduler.proposed_tokens >= 2 * 50 and scheduler.accepted_tokens == scheduler.proposed_tokens


def test_a_poor_draft_changes_nothing_and_rests(tiny, other_tiny, tiny_engines):
    _, off = tiny_engines
    params = SamplingParams(max_tokens=80, temperature=0, ignore_eos=True)
    with drafted(tiny, other_tiny) as engine:
        for prompt in ([11, 500, 23, 901, 77], LOOPING_PROMPT):
            assert_same(run(engine, prompt, params), run(off, prompt, params))
        scheduler = engine.backend.scheduler
        assert scheduler.accepted_tokens < scheduler.proposed_tokens < 2 * 80  # it guessed, missed, and rested


def test_seeded_samples_with_a_draft_are_the_same(scripted, scripted_engines):
    """Sampled output follows the target's distribution draw for draw: a draft's greedy
    guess is a point-mass proposal, which the walk accepts exactly when the target's own
    sampler picks it (the scripted model drafting for itself: most guesses kept)."""
    _, off = scripted_engines
    prompt = off.tokenizer.encode_chat([{"role": "user", "content": f"Repeat after me: {REPLY}"}])
    with drafted(scripted, scripted) as engine:
        for seed in range(6):
            params = SamplingParams(max_tokens=40, temperature=5.0, seed=seed, logprobs=2, presence_penalty=0.3)
            assert_same(run(engine, prompt, params), run(off, prompt, params))
        assert engine.backend.scheduler.accepted_tokens >= 6 * 5


def test_a_draft_with_another_tokenizer_is_refused(tiny, scripted):
    with pytest.raises(ValueError, match="same tokenizer"):
        load_engine(tiny, backend="torch", dtype="float32", draft_dir=scripted)


def test_the_daemon_drafts_with_an_installed_model_and_says_when_it_cannot(start_server, tiny, monkeypatch, tmp_path,
                                                                           caplog):
    """`serve --draft NAME` (or models.yaml's `draft`): an installed model guesses for the
    served one, which answers exactly as without; a draft that is not installed is said in
    the log and the daemon serves with prompt lookup."""
    import shutil

    from elmd.store import Store

    monkeypatch.setenv("ELMD_HOME", str(tmp_path / "home"))
    with Store().installing("tiny-draft") as folder:
        shutil.copytree(tiny, folder, dirs_exist_ok=True)
    question = [{"role": "user", "content": "Count with me: one two three four five"}]
    replies = {}
    for draft in ("tiny-draft", "none", "not-installed"):
        running = start_server(tiny, draft=draft, keep_alive=-1)
        client = OpenAI(base_url=running.v1, api_key="unused")
        reply = client.chat.completions.create(model="tiny-openelm", messages=question, temperature=0, max_tokens=40,
                                               extra_body={"ignore_eos": True})
        replies[draft] = reply.choices[0].message.content
        engine = running.manager.loaded()["tiny-openelm"]
        assert engine.info.extra["draft"] == ("tiny-draft" if draft == "tiny-draft" else None)
        if draft == "tiny-draft":  # a copy of the target: every guess is kept
            accepted = value(scrape(running.base_url), "elmd_speculative_tokens_accepted_total", model="tiny-openelm")
            assert accepted >= 30
    assert replies["tiny-draft"] == replies["none"] == replies["not-installed"]
    assert "draft model not-installed is not installed" in caplog.text


def test_models_yaml_drafts_name_a_model_of_the_same_family():
    from elmd.registry import Registry

    registry = Registry.load()
    drafted = {entry.id: entry.draft for entry in registry if entry.draft}
    assert drafted == {"openelm-1.1b-instruct": "openelm-270m-instruct", "openelm-3b-instruct": "openelm-270m-instruct"}
    for target, draft in drafted.items():
        assert draft.startswith("openelm-") and target.startswith("openelm-")  # one tokenizer
        assert registry.get(draft).draft is None
