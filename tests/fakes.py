"""Test doubles shared by the end-to-end tests."""
import zlib

from agro.grading import GradeResult


class HashGrader:
    """Deterministic pseudo-rewards from the completion text, so a random tiny model still gets
    a learning signal (real grading is tested in test_rewards / test_hostile_grading)."""

    def grade(self, completions, answers):
        return GradeResult(rewards=[float(zlib.crc32(c.encode()) % 2) for c in completions])

    def close(self):
        pass


def make_offline_file(model_dir, out, num_prompts=6, group_size=3, max_new_tokens=6,
                      precision="fp32"):
    """An offline group file from the tiny model, scored by HashGrader (so it carries signal)."""
    from agro.config import GenerateConfig, load_config
    from agro.workflows import generate_offline

    cfg = load_config(GenerateConfig, None, [f"model={model_dir}", f"output={out}",
                                             f"num_prompts={num_prompts}", f"group_size={group_size}",
                                             f"max_new_tokens={max_new_tokens}", f"precision={precision}"])
    path, n = generate_offline(cfg, grader=HashGrader())
    assert n == num_prompts
    return path
