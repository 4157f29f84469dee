"""An RL post-training job file (`plan --job JOB.yaml`, docs/guide/rl.md): the models of the job and their roles,
the rollout of one iteration and the training batch, read strictly and checked as one line per mistake.

    kind: rl
    algorithm: grpo                    # ppo | grpo | dpo
    models:
      - {role: actor, model: qwen2-7b, train: true}
      - {role: reference, model: qwen2-7b, train: false}
    rollout: {prompts_per_step: 128, samples_per_prompt: 8, prompt_len: 512, response_len: 1024}
    training: {global_batch: 256}      # sequences per optimizer step; seq_len: prompt_len + response_len

Which roles an algorithm needs: PPO trains an actor and a critic against a frozen reference and reward model
(Ouyang et al. 2022, section 3.5); GRPO drops the critic and takes the baseline from a group of samples per
prompt (Shao et al. 2024, DeepSeekMath section 4.1); DPO generates nothing and trains the actor on preference
pairs against a frozen reference (Rafailov et al. 2023).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from planner.core.errors import BadInput
from planner.core.limits import MAX_GLOBAL_BATCH, MAX_SEQ_LEN

Algorithm = Literal["ppo", "grpo", "dpo"]
Role = Literal["actor", "critic", "reference", "reward"]
ROLES = ("actor", "critic", "reference", "reward")
MAX_NAME_CHARS = 4096  # a catalog name or a file path: one line, at most PATH_MAX
MAX_SAMPLES_PER_PROMPT = 1024  # GRPO groups are 4-64 samples (DeepSeekMath: 64); 1024 is far past any
MAX_EPOCHS = 100  # passes over one rollout (PPO's ppo_epochs is 1-4)

# Which roles each algorithm needs, may have, and whether each is trained (module docstring).
NEEDS = {"ppo": ("actor", "critic", "reference", "reward"), "grpo": ("actor",), "dpo": ("actor", "reference")}
FORBIDS = {"ppo": (), "grpo": ("critic",), "dpo": ("critic", "reward")}
TRAINED = {"actor": True, "critic": True, "reference": False, "reward": False}
WHY_FORBIDDEN = {("grpo", "critic"): "GRPO has no critic (Shao et al. 2024: the baseline is the group's mean reward)",
                 ("dpo", "critic"): "DPO has no critic (Rafailov et al. 2023: the reward is implicit in the policy)",
                 ("dpo", "reward"): "DPO has no reward model (Rafailov et al. 2023: preferences are the data)"}

_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class JobModel(BaseModel):
    """One model of the job: its role, a catalog name or model file, and whether it is trained."""

    model_config = _STRICT
    role: Role
    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    train: bool

    @field_validator("model")
    @classmethod
    def _one_line(cls, v: str) -> str:
        if not v.isprintable():
            raise ValueError("want a catalog name or a model file path on one line of printable characters")
        return v


class Rollout(BaseModel):
    """The generation of one iteration: prompts x samples sequences of prompt_len + response_len tokens.

    off_policy_steps 1 lets a disaggregated generator produce the next iteration's rollout while the trainer
    trains on this one (one-step off-policy: verl's one_step_off_policy recipe, StreamRL's asynchronous mode);
    0 keeps generation and training strictly in turn (on-policy)."""

    model_config = _STRICT
    prompts_per_step: PositiveInt = Field(le=MAX_GLOBAL_BATCH)
    samples_per_prompt: PositiveInt = Field(1, le=MAX_SAMPLES_PER_PROMPT)
    prompt_len: PositiveInt = Field(le=MAX_SEQ_LEN)
    response_len: PositiveInt = Field(le=MAX_SEQ_LEN)
    off_policy_steps: int = Field(0, ge=0, le=1)  # an int, not Literal: strict mode then refuses true

    @property
    def sequences(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len


class Training(BaseModel):
    """The optimizer steps of one iteration: global_batch sequences each, `epochs` passes over the rollout
    (PPO's ppo_epochs; a rollout larger than global_batch is split into mini-batches, one step each)."""

    model_config = _STRICT
    global_batch: PositiveInt = Field(le=MAX_GLOBAL_BATCH)
    seq_len: PositiveInt | None = Field(None, le=MAX_SEQ_LEN)
    epochs: PositiveInt = Field(1, le=MAX_EPOCHS)


class RLJob(BaseModel):
    model_config = _STRICT
    kind: Literal["rl"]
    algorithm: Algorithm
    # room for more entries than roles, so that a role given twice is named as such
    models: list[JobModel] = Field(min_length=1, max_length=2 * len(ROLES))
    rollout: Rollout | None = None
    training: Training

    @model_validator(mode="after")
    def _roles_fit_the_algorithm(self) -> RLJob:
        seen: dict[str, int] = {}
        for i, m in enumerate(self.models):
            if m.role in seen:
                raise ValueError(f"models.{i}.role: role '{m.role}' is given twice (models.{seen[m.role]} and "
                                 f"models.{i}); keep one model per role")
            seen[m.role] = i
            if m.train != TRAINED[m.role]:
                verb = "is trained" if TRAINED[m.role] else "is frozen"
                raise ValueError(f"models.{i}.train: the {m.role} {verb} in {self.algorithm.upper()}; "
                                 f"set train: {str(TRAINED[m.role]).lower()}")
            if m.role in FORBIDS[self.algorithm]:
                raise ValueError(f"models.{i}.role: {WHY_FORBIDDEN[(self.algorithm, m.role)]}; remove this entry")
        for role in NEEDS[self.algorithm]:
            if role not in seen:
                raise ValueError(f"models: {self.algorithm.upper()} needs a {role} model; add "
                                 f"{{role: {role}, model: NAME, train: {str(TRAINED[role]).lower()}}}")
        self._check_batch()
        return self

    def _check_batch(self) -> None:
        t = self.training
        if self.algorithm == "dpo":
            if self.rollout is not None:
                raise ValueError("rollout: DPO generates nothing (it trains on preference pairs); remove rollout")
            if t.seq_len is None:
                raise ValueError("training.seq_len: DPO needs the length of its preference sequences; "
                                 "add training.seq_len")
            return
        r = self.rollout
        if r is None:
            raise ValueError(f"rollout: {self.algorithm.upper()} generates its training data; add rollout with "
                             "prompts_per_step, samples_per_prompt, prompt_len and response_len")
        if r.seq_len > MAX_SEQ_LEN:
            raise ValueError(f"rollout: prompt_len + response_len = {r.seq_len:,} is past the cap of "
                             f"{MAX_SEQ_LEN:,} tokens per sequence; shorten them")
        if r.sequences > MAX_GLOBAL_BATCH:
            raise ValueError(f"rollout: prompts_per_step x samples_per_prompt = {r.sequences:,} sequences, past "
                             f"the cap of {MAX_GLOBAL_BATCH:,}; lower them")
        if t.seq_len is not None and t.seq_len != r.seq_len:
            raise ValueError(f"training.seq_len: {t.seq_len} differs from prompt_len + response_len = {r.seq_len} "
                             "(training runs on the generated sequences); drop training.seq_len")
        if r.sequences % t.global_batch:
            raise ValueError(f"training.global_batch: the rollout's {r.sequences} sequences (prompts_per_step x "
                             f"samples_per_prompt) are not a whole number of batches of {t.global_batch}; "
                             "give a divisor of it")

    @property
    def sequences(self) -> int:
        """Sequences one iteration generates (or, for DPO, trains on)."""
        return self.rollout.sequences if self.rollout is not None else self.training.global_batch

    @property
    def seq_len(self) -> int:
        return self.rollout.seq_len if self.rollout is not None else int(self.training.seq_len)

    @property
    def steps(self) -> int:
        """Optimizer steps per iteration: the rollout in mini-batches of global_batch, `epochs` times."""
        return self.sequences // self.training.global_batch * self.training.epochs

    def model_of(self, role: str) -> JobModel | None:
        return next((m for m in self.models if m.role == role), None)


def parse_job(data, where: str = "job file") -> RLJob:
    """An RLJob from a file's mapping, strictly (true is not 1, "8" is not 8, no unknown key). BadInput, one
    line naming the file, the key and the fix, otherwise."""
    if not isinstance(data, dict):
        got = "a list" if isinstance(data, list) else type(data).__name__
        raise BadInput(f"{where}: expected a mapping with kind, algorithm, models, rollout and training, got {got}")
    try:
        return RLJob.model_validate(data, strict=True)
    except ValidationError as e:
        raise BadInput(f"{where}: {_one_line(e.errors()[0])}") from None
    except RecursionError:
        raise BadInput(f"{where}: nested too deeply to read") from None


def _one_line(err: dict) -> str:
    loc = ".".join(str(x) for x in err.get("loc", ()))
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, key = loc.rpartition(".")[0], loc.rpartition(".")[2]
        known = _known_keys(parent)
        return f"unknown key '{key}'{' in ' + parent if parent else ''}; known keys: {', '.join(known)}"
    if kind == "missing":
        return f"missing key '{loc}'; add it (docs/guide/rl.md shows a whole job file)"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "value_error":  # our own validators: the job-wide ones name their key themselves
        return f"{loc}: {msg}" if loc else msg
    got = err.get("input")
    shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:56] + "...'"
    return f"{loc}: {msg} (got {shown})"


def _known_keys(parent: str) -> list[str]:
    """The keys allowed at `parent` ("" for the top, "rollout", "models.0", ...)."""
    head = parent.split(".")[0]
    cls = {"": RLJob, "rollout": Rollout, "training": Training, "models": JobModel}.get(head, RLJob)
    return list(cls.model_fields)
