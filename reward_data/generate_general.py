"""Generate the shipped GENERAL data in ``reward_data/``: everyday questions, short explanations,
some code and arithmetic, unrelated to the instruction-following training data. stage=eval's
forgetting check reads the held-out part; ``data.replay`` mixes the replay part into SFT.

Usage::

    python reward_data/generate_general.py            # rewrite the files next to this script
    python reward_data/generate_general.py --out DIR  # write them somewhere else

Standard library only, fully seeded: rerunning reproduces byte-identical files.

Files (each item lands in exactly one of them; held-out and replay never share a fact):

* ``general_text.jsonl``    ``{"text"}``: held-out explanations and code, for perplexity
* ``general_prompts.jsonl`` ``{"prompt"}``: held-out questions, for KL(base || tuned) on the
  base's own greedy answers
* ``general_qa.jsonl``      ``{"prompt", "answer"}``: held-out short-answer questions (arithmetic,
  capitals, opposites, code output, ...), for exact-match
* ``general_sft.jsonl``     ``{"messages"}``: replay rows (the other half of every pool)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261129

EXPLANATIONS = {
    "why the sky is blue": "Sunlight contains every colour. Air molecules scatter short blue wavelengths much more than red ones, so blue light reaches our eyes from every direction of the sky.",
    "how a refrigerator keeps food cold": "A refrigerator pumps a refrigerant through coils. The liquid evaporates inside, absorbing heat from the food, and the compressor pushes that heat out through the coils at the back.",
    "why bread rises": "Yeast in the dough eats sugar and releases carbon dioxide. Gluten traps the gas in small bubbles, and the dough swells; baking sets the bubbles in place.",
    "how vaccines work": "A vaccine shows the immune system a harmless piece or copy of a germ. The body makes antibodies and memory cells, so a later real infection is fought off quickly.",
    "what causes the seasons": "Earth's axis is tilted. For half the year one hemisphere leans towards the sun and gets longer, more direct sunlight, which makes summer there.",
    "how a bicycle stays upright": "A moving bicycle stays up mostly because the rider steers into any lean. The shape of the front fork also helps the wheel turn in the direction of a fall.",
    "why ice floats": "Water expands when it freezes into a crystal lattice. Ice is therefore less dense than liquid water and floats on top of it.",
    "how a credit card payment works": "The card terminal sends the card details to the card network, which asks the issuing bank to approve the amount. The bank reserves the money and settles it with the shop later.",
    "what compound interest is": "Compound interest is interest earned on earlier interest. Each period the interest is added to the balance, so the next period's interest is computed on a larger amount.",
    "how plants drink water": "Roots take in water from the soil. Evaporation from the leaves pulls a continuous column of water up through thin tubes called xylem.",
    "why we sleep": "Sleep lets the brain clear waste products and store memories. The body also repairs tissue and balances hormones during deep sleep.",
    "how a microwave oven heats food": "A microwave oven makes radio waves that make water molecules in food rotate quickly. The motion turns into heat inside the food.",
    "what a recipe's ratio means": "A ratio such as two parts flour to one part water tells you the proportions. You can scale the amounts up or down as long as the proportion stays the same.",
    "how to read a bus timetable": "Find your stop in the left column and follow the row to the right. Each column is one bus, and the time shows when it reaches that stop.",
    "why metal feels colder than wood": "Metal conducts heat away from your hand much faster than wood. Both are at room temperature, but the metal drains heat from your skin quicker.",
    "how a rainbow forms": "Sunlight enters raindrops, bends, reflects off the back of the drop and bends again on the way out. Each colour bends by a different amount, so the colours spread into a bow.",
    "what inflation is": "Inflation is a general rise in prices over time. The same amount of money then buys fewer goods than before.",
    "how email reaches its destination": "Your mail program hands the message to a mail server. That server looks up the recipient's domain and passes the message to the mail server responsible for it.",
    "why the moon has phases": "The moon is always half lit by the sun. As it orbits Earth we see different parts of that lit half, from a thin crescent to a full disc.",
    "how muscles grow": "Exercise makes tiny tears in muscle fibres. During rest the body repairs them and adds protein, so the fibres become thicker and stronger.",
    "what a password manager does": "A password manager stores a different strong password for every site in an encrypted vault. You remember one master password and it fills in the rest.",
    "why leaves change colour in autumn": "In autumn trees stop making green chlorophyll. As it fades, yellow and orange pigments that were there all along become visible.",
    "how a thermostat works": "A thermostat measures the room temperature and switches the heating on when it falls below the set point and off when it rises above it.",
    "what a budget is": "A budget is a plan for money: it lists expected income and spending for a period, so you can see in advance whether they balance.",
    "how sound travels": "Sound is a vibration passed from molecule to molecule. It travels as waves of pressure through air, water or solids, and cannot cross a vacuum.",
    "why we have time zones": "The sun is overhead at different times in different places. Time zones keep noon roughly at midday everywhere by shifting the clock in steps.",
    "how to boil an egg": "Put the egg in boiling water. After about six minutes the yolk is soft, after ten it is firm; cool it in cold water before peeling.",
    "what a fever does": "A fever raises the body's temperature, which slows the growth of many germs and speeds up parts of the immune response.",
    "how tides happen": "The moon's gravity pulls the ocean into a bulge on the side facing it and on the opposite side. Earth turns through these bulges, giving two high tides a day.",
    "why exercise helps the heart": "Regular exercise makes the heart muscle stronger, so it pumps more blood with each beat and rests at a lower rate.",
}

CODE = [
    ("a function that adds two numbers", "def add(a, b):\n    return a + b"),
    ("a loop that prints the numbers from 1 to 5", "for i in range(1, 6):\n    print(i)"),
    ("a function that checks whether a number is even", "def is_even(n):\n    return n % 2 == 0"),
    ("a function that reverses a string", "def reverse(s):\n    return s[::-1]"),
    ("a function that returns the largest item of a list", "def largest(items):\n    return max(items)"),
    ("a list comprehension of the squares of 0 to 9", "squares = [x * x for x in range(10)]"),
    (
        "a function that counts the vowels in a word",
        "def vowels(word):\n    return sum(c in 'aeiou' for c in word.lower())",
    ),
    (
        "reading a file line by line",
        "with open('notes.txt') as f:\n    for line in f:\n        print(line.strip())",
    ),
    ("a dictionary that maps names to ages", "ages = {'ana': 31, 'ben': 27}\nprint(ages['ana'])"),
    (
        "a function that computes a factorial",
        "def factorial(n):\n    return 1 if n <= 1 else n * factorial(n - 1)",
    ),
    ("joining words with spaces", "words = ['hello', 'there', 'world']\nprint(' '.join(words))"),
    ("a function that converts Celsius to Fahrenheit", "def to_fahrenheit(c):\n    return c * 9 / 5 + 32"),
    ("sorting a list of numbers", "numbers = [5, 2, 9, 1]\nnumbers.sort()\nprint(numbers)"),
    ("a while loop that halves a number", "n = 100\nwhile n > 1:\n    n = n // 2\nprint(n)"),
    ("a function that averages a list", "def mean(xs):\n    return sum(xs) / len(xs)"),
    ("a SQL query that counts the rows of a table", "SELECT COUNT(*) FROM orders;"),
]

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Ireland": "Dublin",
    "Poland": "Warsaw",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Russia": "Moscow",
    "China": "Beijing",
    "India": "New Delhi",
    "Mexico": "Mexico City",
    "Cuba": "Havana",
    "Chile": "Santiago",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Thailand": "Bangkok",
    "Argentina": "Buenos Aires",
    "Belgium": "Brussels",
    "Hungary": "Budapest",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "happy": "sad",
    "early": "late",
    "light": "dark",
    "open": "closed",
    "full": "empty",
    "old": "new",
    "high": "low",
    "wet": "dry",
    "hard": "soft",
    "strong": "weak",
    "long": "short",
    "rich": "poor",
    "day": "night",
    "win": "lose",
}
FACTS = [
    ("How many days are in a week?", "7"),
    ("How many legs does a spider have?", "8"),
    ("How many minutes are in an hour?", "60"),
    ("What colour do you get by mixing blue and yellow?", "green"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("How many months are in a year?", "12"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("What gas do plants take in from the air?", "carbon dioxide"),
    ("How many sides does a triangle have?", "3"),
    ("What is the opposite of north?", "south"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("How many hours are in a day?", "24"),
    ("What is the chemical symbol for water?", "H2O"),
    ("How many continents are there?", "7"),
    ("What do bees make?", "honey"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
    ("Which planet is known as the red planet?", "Mars"),
    ("How many seconds are in a minute?", "60"),
    ("What is the first letter of the English alphabet?", "A"),
    ("How many wheels does a bicycle have?", "2"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
EVERYDAY = [
    "What should I pack for a weekend trip to the mountains?",
    "How can I make my houseplants live longer?",
    "What is a good way to start learning a new language?",
    "How do I politely decline an invitation?",
    "What are some healthy breakfast ideas?",
    "How can I save money on groceries?",
    "What should I do if I cannot fall asleep?",
    "How do I clean a cast iron pan?",
    "What are some tips for a job interview?",
    "How can I keep my phone battery healthy?",
    "What is a simple way to stay focused while studying?",
    "How do I make a cup of tea?",
    "What should I look for when buying a used car?",
    "How can I be a better listener?",
    "What is a good stretch after sitting all day?",
    "How do I remove a coffee stain from a shirt?",
    "How much water should I drink in a day?",
    "What is a fun activity for a rainy afternoon?",
    "How do I write a thank-you note?",
    "What are the benefits of walking every day?",
    "How can I organise my week better?",
    "What should I know before adopting a dog?",
    "How do I change a flat tyre on a bicycle?",
    "How can I reduce the plastic I use at home?",
]
SHORT = "Answer with just the answer."


def qa_pool(rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) for every short-answer item: arithmetic, capitals, opposites, facts, days, code."""
    items: list[tuple[str, str]] = []
    for _ in range(70):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        items.append((f"What is {a} {op} {b}?", str(value)))
    items += [(f"What is the capital of {c}?", cap) for c, cap in CAPITALS.items()]
    items += [(f"What is the opposite of '{w}'?", o) for w, o in OPPOSITES.items()]
    items += FACTS
    items += [(f"What day comes after {d}?", DAYS[(i + 1) % 7]) for i, d in enumerate(DAYS)]
    for _ in range(20):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        kind = rng.choice(["add", "len", "mul"])
        if kind == "add":
            items.append((f"In Python, what does print({a} + {b}) output?", str(a + b)))
        elif kind == "mul":
            items.append((f"In Python, what is the value of x after x = {a}; x *= {b}?", str(a * b)))
        else:
            word = rng.choice(["apple", "banana", "river", "cloud", "pencil", "garden", "window"])
            items.append((f"In Python, what does len('{word}') return?", str(len(word))))
    return items


def build(seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    qa = qa_pool(rng)
    rng.shuffle(qa)
    half = len(qa) // 2
    qa_eval, qa_replay = qa[:half], qa[half:]

    texts = [(t, f"{t[0].upper()}{t[1:]}: {body}") for t, body in EXPLANATIONS.items()]
    texts += [(d, f"Here is {d} in code:\n{code}") for d, code in CODE]
    rng.shuffle(texts)
    t_half = len(texts) // 2
    text_eval, text_replay = texts[:t_half], texts[t_half:]

    everyday = list(EVERYDAY)
    rng.shuffle(everyday)
    e_half = len(everyday) // 2
    prompts_eval = [f"Explain {t}." for t, _ in text_eval] + everyday[:e_half]
    prompts_eval += [f"Write {d} in Python." for d, _ in CODE if any(d == t for t, _ in text_eval)]

    replay = [
        {"messages": [{"role": "user", "content": f"{q} {SHORT}"}, {"role": "assistant", "content": a}]}
        for q, a in qa_replay
    ]
    for topic, text in text_replay:
        body = text.split(": ", 1)[1] if ": " in text else text.split("\n", 1)[1]
        ask = f"Write {topic} in Python." if "\n" in text else f"Explain {topic} in two sentences."
        replay.append(
            {"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": body}]}
        )
    for q in everyday[e_half:]:
        replay.append(
            {
                "messages": [
                    {"role": "user", "content": q},
                    {
                        "role": "assistant",
                        "content": "Here are a few practical steps. "
                        "Start small, keep it simple, and adjust as you learn what works for you.",
                    },
                ]
            }
        )
    rng.shuffle(replay)
    return {
        "general_text": [{"text": t} for _, t in text_eval],
        "general_prompts": [{"prompt": [{"role": "user", "content": p}]} for p in prompts_eval],
        "general_qa": [
            {"prompt": [{"role": "user", "content": f"{q} {SHORT}"}], "answer": a} for q, a in qa_eval
        ],
        "general_sft": replay,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in build().items():
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
