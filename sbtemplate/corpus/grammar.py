"""Seeded sentence grammars written for this project (no copied text).

Two text domains:

* ``general``: everyday narrative sentences and word lists; the base
  recognizer and the base LM are trained on it.
* ``target``: short voice-assistant commands (timers, alarms, unit conversion,
  arithmetic), each with a semantics label (intent + slots). Its text-only
  split feeds LM fine-tuning and its speech is the test set.

The general grammar deliberately uses every word of the target domain
(numbers, units, times, "what is", "plus", "wake me up", "cancel"...) in other
contexts, so the acoustic model has heard them; what it lacks is the target
domain's word order, which is what LM fine-tuning teaches. Without that, an
attention decoder trained on narrative sentences alone rewrites every command
into a narrative sentence whatever the LM says.
"""

import random

ONES = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
]
TEENS = [
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n):
    """1..99 as English words ("forty two")."""
    if not 1 <= n <= 99:
        raise ValueError(f"number out of range: {n}")
    if n < 10:
        return ONES[n - 1]
    if n < 20:
        return TEENS[n - 10]
    tens, ones = divmod(n, 10)
    return TENS[tens - 2] + ("" if ones == 0 else " " + ONES[ones - 1])


# ----------------------------------------------------------------- general --
_G = {
    "person": [
        "the farmer",
        "my sister",
        "the old teacher",
        "a young doctor",
        "the captain",
        "her brother",
        "the baker",
        "our neighbour",
        "the little girl",
        "a tired sailor",
        "the gardener",
        "his mother",
        "the driver",
        "a quiet student",
        "the painter",
        "my uncle",
        "the nurse",
        "a clever boy",
        "the king",
        "the singer",
    ],
    "people": [
        "the children",
        "the workers",
        "my friends",
        "the soldiers",
        "the villagers",
        "the guests",
        "the players",
        "our parents",
        "the travellers",
        "the fishermen",
    ],
    "thing": [
        "a red apple",
        "the heavy box",
        "an old letter",
        "the blue coat",
        "a small boat",
        "the wooden chair",
        "a loaf of bread",
        "the silver key",
        "a green bottle",
        "the broken clock",
        "a warm blanket",
        "the long rope",
        "a paper map",
        "the iron gate",
        "a basket of eggs",
        "the bright lamp",
        "a new book",
    ],
    "place": [
        "the river",
        "the market",
        "the village",
        "the station",
        "the garden",
        "the harbour",
        "the kitchen",
        "the forest",
        "the church",
        "the bridge",
        "the hill",
        "the school",
        "the farm",
        "the beach",
        "the library",
        "the city",
    ],
    "verb_past": [
        "found",
        "carried",
        "painted",
        "opened",
        "dropped",
        "sold",
        "bought",
        "mended",
        "washed",
        "hid",
        "lifted",
        "cleaned",
        "brought",
        "wanted",
        "counted",
    ],
    "move_past": [
        "walked",
        "ran",
        "drove",
        "sailed",
        "rode",
        "wandered",
        "hurried",
        "travelled",
        "climbed",
        "swam",
    ],
    "adj": [
        "cold",
        "quiet",
        "bright",
        "dark",
        "warm",
        "busy",
        "empty",
        "beautiful",
        "noisy",
        "green",
        "wet",
        "peaceful",
        "crowded",
        "strange",
    ],
    "weather": [
        "the rain",
        "the wind",
        "the snow",
        "the storm",
        "the sun",
        "the fog",
    ],
    "time_phrase": [
        "in the morning",
        "at night",
        "after dinner",
        "before noon",
        "on monday",
        "on friday",
        "last winter",
        "every evening",
        "in the spring",
        "at dawn",
        "at half past nine",
        "tonight",
        "tomorrow",
        "in the evening",
    ],
    "unit": [
        "miles",
        "kilometers",
        "minutes",
        "hours",
        "seconds",
        "pounds",
        "grams",
        "kilograms",
        "meters",
        "feet",
        "inches",
        "liters",
        "days",
        "weeks",
    ],
}


def _article(word):
    return "an" if word[0] in "aeio" else "a"


def _n(rng, hi=60):
    return number_words(rng.randint(2, hi))


def _heard_n(rng, hi=60):
    """A number in 2..hi for general speech, drawn so that every number word is
    heard often enough.

    Uniform draws make "seven" (7, 27, ..., 97) nine times as frequent as
    "seventeen" or "eleven", and a recognizer trained on them hears the rarer
    word as its frequent neighbour ("minus nineteen" -> "minus nine"). Half the
    draws are one-word numbers (up to nineteen), half uniform over the range.
    """
    if rng.random() < 0.5:
        return number_words(rng.randint(2, min(hi, 19)))
    return _n(rng, hi)


_HOURS = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]
# spoken operator -> the target domain's semantics label
_OPS = {"plus": "add", "minus": "subtract", "times": "multiply", "divided by": "divide"}


def _time(rng, g):
    """A time phrase; about a third are clock times over all twelve hours."""
    if rng.random() < 0.35:
        minute = rng.choice(["o'clock", "thirty", "fifteen", "forty five", "twenty"])
        return f"at {rng.choice(_HOURS)} {minute}"
    return rng.choice(g["time_phrase"])


_GENERAL_TEMPLATES = [
    lambda r, g: (
        f"{r.choice(g['person'])} {r.choice(g['verb_past'])} {r.choice(g['thing'])} near {r.choice(g['place'])}"
    ),
    lambda r, g: (
        f"{r.choice(g['people'])} {r.choice(g['move_past'])} to {r.choice(g['place'])} {_time(r, g)}"
    ),
    lambda r, g: (
        f"{r.choice(g['person'])} {r.choice(g['move_past'])} {_heard_n(r)} {r.choice(['miles', 'kilometers', 'meters'])} to reach {r.choice(g['place'])}"
    ),
    lambda r, g: (
        f"{r.choice(g['place'])} was {r.choice(g['adj'])} and {r.choice(g['adj'])} {_time(r, g)}"
    ),
    lambda r, g: (
        f"{r.choice(g['weather'])} lasted for {_heard_n(r, 30)} {r.choice(['hours', 'days', 'minutes', 'weeks'])}"
    ),
    lambda r, g: (
        f"{r.choice(g['person'])} waited {_heard_n(r)} minutes for {r.choice(g['people'])} at {r.choice(g['place'])}"
    ),
    lambda r, g: (
        f"{r.choice(g['people'])} carried {_heard_n(r, 40)} {r.choice(['pounds', 'kilograms', 'liters'])} of water from {r.choice(g['place'])}"
    ),
    lambda r, g: (
        f"{r.choice(g['person'])} said that {r.choice(g['thing'])} was {r.choice(g['adj'])}"
    ),
    lambda r, g: (
        f"{_time(r, g)} {r.choice(g['person'])} {r.choice(g['verb_past'])} {r.choice(g['thing'])}"
    ),
    lambda r, g: (
        f"there were {_heard_n(r, 90)} {r.choice(['boats', 'houses', 'trees', 'horses', 'lamps', 'chairs'])} in {r.choice(g['place'])}"
    ),
    lambda r, g: (
        f"{r.choice(g['person'])} and {r.choice(g['person'])} {r.choice(g['move_past'])} past {r.choice(g['place'])}"
    ),
    lambda r, g: (
        f"the road to {r.choice(g['place'])} is {_heard_n(r, 80)} {r.choice(['miles', 'kilometers'])} long"
    ),
    lambda r, g: (
        f"{r.choice(g['person'])} {r.choice(g['verb_past'])} {r.choice(g['thing'])} and gave it to {r.choice(g['people'])}"
    ),
    lambda r, g: (
        f"after {_heard_n(r, 20)} {r.choice(['days', 'weeks', 'hours'])} {r.choice(g['weather'])} stopped"
    ),
    lambda r, g: (
        f"{r.choice(g['people'])} counted {_heard_n(r, 99)} {r.choice(['coins', 'stars', 'birds', 'sheep', 'stones'])} {_time(r, g)}"
    ),
    lambda r, g: f"the clock in {r.choice(g['place'])} stopped {_time(r, g)}",
    lambda r, g: (
        f"{r.choice(g['person'])} set the table and waited until {r.choice(_HOURS)} o'clock"
    ),
    lambda r, g: (
        f"{r.choice(g['person'])} measured {_heard_n(r, 50)} {r.choice(['feet', 'inches', 'meters', 'centimeters'])} of {r.choice(['rope', 'cloth', 'wire', 'fence'])}"
    ),
    lambda r, g: (
        f"{r.choice(g['person'])} heard the {r.choice(['alarm', 'old timer', 'kitchen timer', 'church bell'])} {_time(r, g)}"
    ),
    lambda r, g: (
        f"{r.choice(g['people'])} tried to calculate how many {r.choice(g['unit'])} were left"
    ),
    lambda r, g: (
        f"{r.choice(g['person'])} poured {_heard_n(r, 30)} {r.choice(['ounces', 'gallons', 'liters'])} of milk into {r.choice(['the bucket', 'a jar', 'the pot'])}"
    ),
    lambda r, g: (
        f"{r.choice(g['person'])} wanted to {r.choice(['convert', 'change', 'divide', 'multiply', 'count'])} {r.choice(g['thing'])} into {r.choice(['money', 'pieces', 'gold', 'bread'])}"
    ),
    # Questions, requests and arithmetic in narrative contexts: the target
    # domain's words, never its command patterns.
    lambda r, g: f"what is the name of {r.choice(g['place'])} asked {r.choice(g['person'])}",
    lambda r, g: f"how much is {r.choice(g['thing'])} asked {r.choice(g['person'])}",
    lambda r, g: (
        f"please tell me why {r.choice(g['people'])} {r.choice(g['move_past'])} to {r.choice(g['place'])}"
    ),
    lambda r, g: (
        f"{r.choice(g['person'])} asked {r.choice(g['people'])} to wake {r.choice(['me', 'her', 'him', 'us'])} up {_time(r, g)}"
    ),
    lambda r, g: (
        f"{r.choice(g['person'])} wrote {_heard_n(r, 99)} {r.choice(list(_OPS))} {_heard_n(r, 20)} on {r.choice(['the board', 'a paper map', 'the wall'])}"
    ),
    # Arithmetic ending on its second number, as the commands do.
    lambda r, g: (
        f"{r.choice(g['people'])} had to work out {_heard_n(r, 99)} {r.choice(list(_OPS))} {_heard_n(r, 20)}"
    ),
    lambda r, g: (
        f"on {r.choice(['the board', 'the card', 'the wall'])} {r.choice(g['person'])} wrote {_heard_n(r, 99)} {r.choice(list(_OPS))} {_heard_n(r, 20)}"
    ),
    lambda r, g: (
        f"{r.choice(g['person'])} had to cancel the trip to {r.choice(g['place'])} {_time(r, g)}"
    ),
    lambda r, g: (
        f"{r.choice(g['person'])} turned off the {r.choice(['lamp', 'radio', 'alarm', 'timer', 'stove'])} and {r.choice(['went to sleep', 'left the room', 'started to read'])}"
    ),
    lambda r, g: (
        f"{r.choice(g['people'])} will {r.choice(['start', 'stop'])} the {r.choice(['race', 'game', 'music'])} {r.choice(['tonight', 'tomorrow', 'in the evening', 'in the morning'])}"
    ),
    lambda r, g: (
        f"{r.choice(g['person'])} set {r.choice(['an alarm', 'a timer', 'a trap', 'the clock'])} {r.choice(['before dinner', 'for my friends', 'in the kitchen'])}"
    ),
    lambda r, g: (
        f"{r.choice(g['people'])} began to count down from {_heard_n(r, 90)} {r.choice(['seconds', 'minutes'])}"
    ),
    lambda r, g: (
        f"{_heard_n(r, 99)} {r.choice(['miles', 'pounds', 'feet', 'inches', 'liters', 'grams'])} is about {_heard_n(r, 99)} {r.choice(['kilometers', 'kilograms', 'meters', 'centimeters', 'gallons', 'ounces'])}"
    ),
    lambda r, g: (
        f"{r.choice(g['person'])} took a {_heard_n(r, 20)} {r.choice(['minute', 'hour', 'second'])} break {_time(r, g)}"
    ),
    lambda r, g: (
        f"there are {_heard_n(r, 90)} {r.choice(['boats', 'houses', 'trees', 'horses'])} near {r.choice(g['place'])} and it is your turn to count them"
    ),
    lambda r, g: (
        f"stop the {r.choice(['music', 'boat', 'car', 'game'])} please said {r.choice(g['person'])} {_time(r, g)}"
    ),
]

# Word lists, read aloud as in the word-list sections of speech corpora: the
# target domain's words and numbers in random order, 2 to 6 items. They teach
# the acoustic model these words without any sentence context to lean on, and
# end utterances on every kind of word (narrative sentences end mostly on
# places and times, and an attention decoder trained on them alone appends a
# time to every command). The target domain's word order stays unseen.
_LIST_WORDS = [
    "calculate",
    "tell me",
    "convert",
    "change",
    "how much is",
    "how many",
    "what is",
    "set",
    "start",
    "stop",
    "cancel",
    "turn off",
    "wake me up",
    "count down",
    "please",
    "timer",
    "alarm",
    "my",
    "the",
    "a",
    "an",
    "are",
    "is",
    "in",
    "into",
    "to",
    "for",
    "at",
    "plus",
    "minus",
    "times",
    "divided by",
    "o'clock",
    "thirty",
    "fifteen",
    "forty five",
    "in the morning",
    "in the evening",
    "tonight",
    "tomorrow",
    "second",
    "minute",
    "hour",
    "seconds",
    "minutes",
    "hours",
    "miles",
    "kilometers",
    "pounds",
    "kilograms",
    "feet",
    "meters",
    "inches",
    "centimeters",
    "liters",
    "gallons",
    "grams",
    "ounces",
]


def _number_list(r):
    return " ".join(_heard_n(r, 99) for _ in range(r.randint(2, 5)))


def _word_list(r):
    items = [
        r.choice(_LIST_WORDS) if r.random() < 0.6 else _heard_n(r, 99)
        for _ in range(r.randint(2, 6))
    ]
    return " ".join(items)


_LIST_TEMPLATES = [
    lambda r, g: _number_list(r),
    lambda r, g: _word_list(r),
    lambda r, g: _word_list(r),
]
LIST_SHARE = 0.25  # share of general sentences that are word lists

# ------------------------------------------------------------------ target --
_TIME_UNITS = ["seconds", "minutes", "hours"]
_CONVERSIONS = [
    ("miles", "kilometers"),
    ("kilometers", "miles"),
    ("pounds", "kilograms"),
    ("kilograms", "pounds"),
    ("feet", "meters"),
    ("meters", "feet"),
    ("inches", "centimeters"),
    ("liters", "gallons"),
    ("grams", "ounces"),
]


def _target_timer(r):
    n = _n(r, 90)
    unit = r.choice(_TIME_UNITS)
    text = r.choice(
        [
            f"set a timer for {n} {unit}",
            f"start a timer for {n} {unit}",
            f"please set {_article(n)} {n} {unit[:-1]} timer",
            f"timer for {n} {unit} please",
            f"count down {n} {unit}",
        ]
    )
    return text, {"intent": "set_timer", "slots": {"duration": n, "unit": unit}}


def _target_alarm(r):
    hour = r.choice(_HOURS)
    minute = r.choice(["o'clock", "thirty", "fifteen", "forty five"])
    period = r.choice(["in the morning", "in the evening", "tonight", "tomorrow"])
    time = f"{hour} {minute}"
    text = r.choice(
        [
            f"set an alarm for {time} {period}",
            f"wake me up at {time} {period}",
            f"please set my alarm for {time} {period}",
            f"alarm at {time} {period}",
        ]
    )
    return text, {"intent": "set_alarm", "slots": {"time": time, "when": period}}


def _target_cancel(r):
    what = r.choice(["timer", "alarm"])
    text = r.choice(
        [
            f"cancel the {what}",
            f"stop my {what}",
            f"please cancel my {what}",
            f"turn off the {what}",
        ]
    )
    return text, {"intent": f"cancel_{what}", "slots": {}}


def _target_convert(r):
    src, dst = r.choice(_CONVERSIONS)
    n = _n(r, 99)
    text = r.choice(
        [
            f"convert {n} {src} to {dst}",
            f"how many {dst} are in {n} {src}",
            f"what is {n} {src} in {dst}",
            f"change {n} {src} into {dst}",
        ]
    )
    return text, {"intent": "convert_units", "slots": {"amount": n, "from": src, "to": dst}}


def _target_arith(r):
    a, b = _n(r, 99), _n(r, 20)
    op = r.choice(list(_OPS))
    text = r.choice(
        [
            f"what is {a} {op} {b}",
            f"calculate {a} {op} {b}",
            f"tell me {a} {op} {b}",
            f"how much is {a} {op} {b}",
        ]
    )
    return text, {"intent": "arithmetic", "slots": {"left": a, "operator": _OPS[op], "right": b}}


_TARGET_GENERATORS = [
    (_target_timer, 3),
    (_target_alarm, 3),
    (_target_cancel, 1),
    (_target_convert, 3),
    (_target_arith, 3),
]


def _normalise(text):
    return " ".join(text.upper().replace("'", "'").split())


def general_sentence(rng):
    """One general-domain sentence, upper case as in LibriSpeech transcripts."""
    templates = _LIST_TEMPLATES if rng.random() < LIST_SHARE else _GENERAL_TEMPLATES
    return _normalise(rng.choice(templates)(rng, _G))


def target_sentence(rng):
    """One target-domain command and its semantics label."""
    funcs, weights = zip(*_TARGET_GENERATORS)
    text, semantics = rng.choices(funcs, weights=weights)[0](rng)
    return _normalise(text), semantics


def unique_sentences(make, count, rng, taken, max_tries_factor=200):
    """Draw ``count`` sentences not in ``taken`` (updated in place), in draw order."""
    out = []
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > count * max_tries_factor:
            raise RuntimeError(
                f"The grammar ran out of unique sentences after {len(out)} of {count}"
            )
        item = make(rng)
        text = item[0] if isinstance(item, tuple) else item
        if text in taken:
            continue
        taken.add(text)
        out.append(item)
    return out


def split_domains(sizes, seed):
    """All text of both domains, disjoint across splits.

    ``sizes`` maps split name → count; names starting with ``target`` draw from
    the target grammar (with semantics), the others from the general grammar.
    One shared ``taken`` set guarantees that no sentence occurs in two splits,
    so test sentences never occur in any training text.
    """
    rng = random.Random(seed)
    taken = set()
    splits = {}
    # Test splits are drawn first so that their sentences are fixed by the seed
    # alone, whatever the sizes of the training splits.
    for name in sorted(sizes, key=lambda n: (not n.endswith("test"), n)):
        make = target_sentence if name.startswith("target") else general_sentence
        splits[name] = unique_sentences(make, sizes[name], rng, taken)
    return splits
