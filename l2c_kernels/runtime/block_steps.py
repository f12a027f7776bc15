"""Which step and which pass a call of a block-level module is.

The step comes from the timestep argument where reading it costs no device sync (a Python number or a CPU
tensor; ``timestep_check="strict"`` always reads it, ``"off"`` never), mapped to the sampler's timestep for
families whose pipelines pass ``t / 1000`` and the like; a call whose timestep is not read is the next step.

Passes. Some pipelines call the transformer more than once per step -- Wan runs the conditional and the
unconditional text as two calls, each inside ``transformer.cache_context("cond")`` /
``("uncond")`` (diffusers' cache hook protocol). The module answers ``cache_context`` itself: each context
name is one pass with its own caches (in the order the names first come), and a pass other than the first
is the current step again -- no timestep read is needed, so this also holds on a GPU. The context is passed
on to the wrapped model's own ``cache_context``. Without contexts, a call whose timestep is read and equals
the current step's is the step's next pass, and a call whose timestep is not read advances
``passes_per_step`` calls per step (set by hand).
"""
from __future__ import annotations

import contextlib


from ..schedule import next_step_index, same_timestep
from .drop_in import check_timestep_mode


class BlockSteps:
    """Step and pass resolution for a block-level module; mixed into the module class."""

    def _init_steps(self, passes_per_step: int, timestep_check: str) -> None:
        self.passes_per_step, self.timestep_check = int(passes_per_step), check_timestep_mode(timestep_check)
        self._step: int | None = None
        self._pass = 0
        self._forced_step: int | None = None
        self._context: tuple[int, int | None] | None = None  # (pass, the pipeline's step index) in a cache_context
        self.context_passes: dict[str, int] = {}  # cache_context name -> pass

    @property
    def current_pass(self) -> int:
        """Which call of the current step ran last (0 for the first)."""
        return self._pass

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        """A pipeline's ``with transformer.cache_context("cond" | "uncond", step_index=i, ...)``: calls inside are
        pass ``k`` of their step, ``k`` the order in which ``name`` first came (see the module docstring)."""
        p = self.context_passes.setdefault(name, len(self.context_passes))
        step_index = kwargs.get("step_index")
        outer = getattr(self.original_model, "cache_context", None)
        saved, self._context = self._context, (p, step_index if isinstance(step_index, int) else None)
        try:
            with (outer(name, **kwargs) if outer is not None else contextlib.nullcontext()):
                yield
        finally:
            self._context = saved

    def _timestep(self, args, kwargs):
        try:
            bound = self._model_sig.bind(self.original_model, *args, **kwargs).arguments
        except TypeError as e:
            raise TypeError(f"{self.pattern.model_class}.forward: {e}") from None
        return bound.get(self.pattern.timestep_arg)

    def _resolve(self, args, kwargs) -> tuple[int, int]:
        cur, ctx, n = self._step, self._context, self.schedule.num_steps
        if self._forced_step is not None:
            s, self._forced_step = self._forced_step, None
            return s, (ctx[0] if ctx else self._pass + 1 if s == cur else 0)
        t = self._timestep(args, kwargs)
        if t is None:
            raise ValueError(f"the transformer was called without {self.pattern.timestep_arg!r}; pass it or call "
                             f"set_step()")
        v = self._host_timestep(t)   # (DropInModule)
        if v is None:  # not read (no host sync): the pipeline's step index, or count calls
            if ctx is not None:
                if ctx[1] is not None and ctx[1] < n:
                    return ctx[1], ctx[0]
                if ctx[0] > 0 and cur is not None:
                    return cur, ctx[0]
                return (0 if cur is None else (cur + 1) % n), ctx[0]
            if cur is None:
                return 0, 0
            if self._pass + 1 < self.passes_per_step:
                return cur, self._pass + 1
            return (cur + 1) % n, 0
        ts = self.pattern.sampler_timestep(self.original_model, v)
        if cur is not None and same_timestep(self.schedule.timesteps[cur], ts) and (ctx is None or ctx[0] > 0):
            return cur, (ctx[0] if ctx else self._pass + 1)
        s = next_step_index(self.schedule.timesteps, ts, cur)
        if s is None:
            s = self.schedule.step_index(ts, after=cur)  # raises naming both step lists if unknown
        return s, (ctx[0] if ctx else 0)
