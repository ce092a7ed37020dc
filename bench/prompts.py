"""The prompts the decoding benches feed their models (bench.decoding, bench.speculative).

The seed article (../shared/docs/seeds/000_32a88b6b5a7b5689.txt) used five prompts; bench.decoding
always starts with them and adds a set, bench.speculative takes one set as it is.
"""

# The seed article's five prompts, verbatim.
ARTICLE_PROMPTS = [
    "Large Language models are",
    "Barack Obama was",
    "Decoding strategy is important because",
    "A good recipe for Halloween is",
    "Stanford is known for",
]
# Ours: ten in the voice of the char models' training text, ten general. Only characters that
# tinyshakespeare has (no digits, no double quotes), so the char models can read every one.
OUR_PROMPTS = [
    "ROMEO:\n", "JULIET:\nO ", "First Citizen:\nWe are", "KING RICHARD II:\nThe", "To be, or not to be,",
    "The king is dead, and", "My lord, the queen", "What light through yonder", "Now is the winter of",
    "Friends, Romans, countrymen,",
    "The weather today is", "In the beginning of the war,", "The best way to learn a language is",
    "Once upon a time, there was", "The city council voted on", "Scientists have discovered that",
    "My favourite book is", "The old man walked to the sea and", "Music can change the way we",
    "The history of the printing press",
]
# For code models (Qwen2.5-Coder): ten openings of code, Python mostly.
CODE_PROMPTS = [
    "def quicksort(arr):\n", "class Stack:\n    def __init__(self):\n", "def is_prime(n: int) -> bool:\n",
    "import numpy as np\n\ndef normalize(", "# Read a CSV file and print the mean of its second column\nimport csv\n",
    "def binary_search(items, target):\n    \"\"\"", "def merge_sorted_lists(a, b):\n",
    "SELECT name, COUNT(*) FROM orders", "function debounce(fn, delay) {\n",
    "# Count the words of a text file and print the ten most common\n",
]
PROMPT_SETS = {"article": ARTICLE_PROMPTS, "general": OUR_PROMPTS, "code": CODE_PROMPTS}
