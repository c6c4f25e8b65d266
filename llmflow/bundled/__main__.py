"""Rewrite the committed bundled JSONL, deterministically: python -m llmflow.bundled"""

from llmflow.bundled import N_ROWS, SEED, bundled_path, generate_examples, write_examples

if __name__ == "__main__":
    write_examples(generate_examples(N_ROWS, SEED), bundled_path())
    print(bundled_path())
