"""A small built-in retrieval set: questions → the statement that answers them.

Each topic has a question, the answer (a statement) and a distractor: the same question asked in
other words. A paraphrase model such as all-MiniLM-L6-v2 ranks the distractor first (it is the
most *similar* text), while retrieval wants the *answer*. Fine-tuning with the distractors as
hard negatives teaches the difference, and it carries over to held-out topics, so a short LoRA
run shows a clear before/after gain. Hand-written for fastlm's tests and examples.
"""

from __future__ import annotations

# (question, answer, distractor question)
TOPICS: list[tuple[str, str, str]] = [
    (
        "What does a barometer measure?",
        "A barometer measures atmospheric pressure.",
        "Which quantity is a barometer used to measure?",
    ),
    (
        "Who wrote Pride and Prejudice?",
        "Jane Austen is the author of Pride and Prejudice.",
        "Which author wrote the novel Pride and Prejudice?",
    ),
    (
        "What is the boiling point of water at sea level?",
        "At sea level water boils at 100 degrees Celsius.",
        "At what temperature does water boil at sea level?",
    ),
    (
        "How many legs does a spider have?",
        "Spiders have eight legs.",
        "What is the number of legs on a spider?",
    ),
    (
        "What gas do plants absorb from the air?",
        "Plants take in carbon dioxide from the atmosphere.",
        "Which gas is absorbed from the air by plants?",
    ),
    (
        "What is the capital of Japan?",
        "Tokyo is the capital city of Japan.",
        "Which city is the capital of Japan?",
    ),
    (
        "Which planet is known as the red planet?",
        "Mars is called the red planet because of its rusty soil.",
        "What planet is nicknamed the red planet?",
    ),
    (
        "What is the largest ocean on Earth?",
        "The Pacific is the largest ocean on Earth.",
        "Which ocean on Earth is the biggest?",
    ),
    (
        "How many days are in a leap year?",
        "A leap year has 366 days.",
        "What is the number of days in a leap year?",
    ),
    (
        "What organ pumps blood through the body?",
        "The heart pumps blood around the body.",
        "Which organ is responsible for pumping blood through the body?",
    ),
    (
        "Who painted the Mona Lisa?",
        "Leonardo da Vinci painted the Mona Lisa.",
        "Which artist painted the Mona Lisa?",
    ),
    (
        "What is the chemical symbol for gold?",
        "Gold has the chemical symbol Au.",
        "Which chemical symbol stands for gold?",
    ),
    (
        "What is the freezing point of water in Fahrenheit?",
        "Water freezes at 32 degrees Fahrenheit.",
        "At how many degrees Fahrenheit does water freeze?",
    ),
    (
        "Which animal is the largest mammal?",
        "The blue whale is the largest mammal.",
        "What is the biggest mammal in the world?",
    ),
    (
        "What language is spoken in Brazil?",
        "Portuguese is the main language of Brazil.",
        "Which language do people in Brazil speak?",
    ),
    (
        "How many continents are there?",
        "There are seven continents.",
        "What is the number of continents on Earth?",
    ),
    (
        "What is the hardest natural substance?",
        "Diamond is the hardest natural material.",
        "Which natural substance is the hardest?",
    ),
    (
        "Who developed the theory of relativity?",
        "Albert Einstein developed the theory of relativity.",
        "Which scientist came up with the theory of relativity?",
    ),
    (
        "What is the main ingredient of guacamole?",
        "Guacamole is made mostly from avocado.",
        "Which ingredient is guacamole mainly made from?",
    ),
    (
        "What is the square root of sixty-four?",
        "Eight is the square root of sixty-four.",
        "Which number is the square root of sixty-four?",
    ),
    ("What do bees make?", "Bees produce honey and wax.", "What is it that bees produce?"),
    (
        "Which instrument has eighty-eight keys?",
        "A standard piano has eighty-eight keys.",
        "What musical instrument has eighty-eight keys?",
    ),
    (
        "What is the tallest mountain in the world?",
        "Mount Everest is the highest mountain on Earth.",
        "Which mountain is the tallest in the world?",
    ),
    (
        "How many hours are in a day?",
        "A day has twenty-four hours.",
        "What is the number of hours in one day?",
    ),
    (
        "What is the currency of the United Kingdom?",
        "The United Kingdom uses the pound sterling.",
        "Which currency is used in the United Kingdom?",
    ),
    (
        "Which bird is a symbol of peace?",
        "The dove is a symbol of peace.",
        "What bird symbolises peace?",
    ),
    (
        "What is the smallest prime number?",
        "Two is the smallest prime number.",
        "Which number is the smallest prime?",
    ),
    (
        "What vitamin does sunlight help the body make?",
        "Sunlight helps the skin produce vitamin D.",
        "Which vitamin is made by the body with the help of sunlight?",
    ),
    (
        "Who was the first person to walk on the moon?",
        "Neil Armstrong was the first person to walk on the moon.",
        "Which person walked on the moon first?",
    ),
    (
        "What is the longest river in Africa?",
        "The Nile is the longest river in Africa.",
        "Which river in Africa is the longest?",
    ),
    (
        "How many sides does a hexagon have?",
        "A hexagon has six sides.",
        "What is the number of sides of a hexagon?",
    ),
    (
        "What do caterpillars turn into?",
        "Caterpillars become butterflies or moths.",
        "What does a caterpillar turn into?",
    ),
    (
        "Which metal is liquid at room temperature?",
        "Mercury is a metal that is liquid at room temperature.",
        "What metal stays liquid at room temperature?",
    ),
    (
        "What is the speed of light?",
        "Light travels at about 300,000 kilometres per second.",
        "How fast does light travel?",
    ),
    (
        "Which country gifted the Statue of Liberty to the United States?",
        "France gave the Statue of Liberty to the United States.",
        "What country gave the United States the Statue of Liberty?",
    ),
    (
        "What is the largest desert in the world?",
        "The Antarctic desert is the largest desert in the world.",
        "Which desert is the biggest in the world?",
    ),
    (
        "How many players are on a soccer team on the field?",
        "A soccer team fields eleven players.",
        "What is the number of players a soccer team has on the field?",
    ),
    (
        "What part of the plant conducts photosynthesis?",
        "Leaves carry out most of a plant's photosynthesis.",
        "Which part of a plant does photosynthesis?",
    ),
    (
        "Who invented the telephone?",
        "Alexander Graham Bell is credited with inventing the telephone.",
        "Which inventor created the telephone?",
    ),
    (
        "What is the coldest planet in the solar system?",
        "Uranus has the coldest atmosphere of any planet in the solar system.",
        "Which planet in the solar system is the coldest?",
    ),
    (
        "What is the main language of Argentina?",
        "Spanish is the main language of Argentina.",
        "Which language is mostly spoken in Argentina?",
    ),
    (
        "How many bones are in the adult human body?",
        "An adult human skeleton has 206 bones.",
        "What is the number of bones in an adult human body?",
    ),
    (
        "What is the capital of Canada?",
        "Ottawa is the capital of Canada.",
        "Which city is the capital of Canada?",
    ),
    ("What do pandas mostly eat?", "Pandas eat mainly bamboo.", "What is the main food of pandas?"),
    (
        "Which element do living things need to breathe?",
        "Animals need oxygen to breathe.",
        "What element is needed by living things for breathing?",
    ),
    (
        "What shape has three sides?",
        "A triangle is a shape with three sides.",
        "Which shape is made of three sides?",
    ),
    (
        "What is the closest star to Earth?",
        "The Sun is the closest star to Earth.",
        "Which star is nearest to the Earth?",
    ),
    (
        "How many strings does a violin have?",
        "A violin has four strings.",
        "What is the number of strings on a violin?",
    ),
]


def retrieval_demo(train_fraction: float = 2 / 3) -> dict:
    """Train rows and a held-out retrieval split (topics not seen in training).

    Usage: ``data = retrieval_demo()``; ``data["train"]`` is a list of
    ``{"query", "response", "rejected_response": [distractor]}`` rows; ``data["eval"]`` has
    ``queries`` (id → text), ``corpus`` (id → text: held-out answers *and* distractors) and
    ``relevant`` (query id → {answer id}), ready for ``evaluate_retrieval``.
    """
    cut = round(len(TOPICS) * train_fraction)
    train = [
        {"query": q, "response": answer, "rejected_response": [distractor]}
        for q, answer, distractor in TOPICS[:cut]
    ]
    queries, corpus, relevant = {}, {}, {}
    for i, (q, answer, distractor) in enumerate(TOPICS[cut:]):
        queries[f"q{i}"] = q
        corpus[f"a{i}"] = answer
        corpus[f"d{i}"] = distractor
        relevant[f"q{i}"] = {f"a{i}"}
    return {"train": train, "eval": {"queries": queries, "corpus": corpus, "relevant": relevant}}
