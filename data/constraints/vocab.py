"""The small word lists parameters are sampled from.

The lists are kept disjoint where two rules could meet in one dialogue (a word
that one rule requires is never a word another forbids; a persona's name is
never the user's name), so no pair of sampled parameters can contradict each
other. The tests check the disjointness.
"""

from __future__ import annotations

START_WORDS = ("Indeed", "Certainly", "Well", "Alright", "Sure thing", "Good question")
END_PHRASES = ("Over.", "That is all.", "Over and out.", "Hope this helps.", "End of message.")
USER_END_PHRASES = ("cheers", "take care", "bye for now", "peace out")
# Follow-up questions appended by the end-with-a-question rewrite.
QUESTIONS = ("Does that help?", "Shall I go on?", "Would you like more detail?", "What do you think?")

REQUIRED_WORDS = (
    "garden",
    "river",
    "lantern",
    "harbor",
    "meadow",
    "compass",
    "violin",
    "orchard",
    "pebble",
    "kettle",
)
# Sentences that bring a required word in; "{w}" is the word.
MENTION_TEMPLATES = ("This reminds me of {w}.", "The word {w} comes to mind.", "I keep thinking of {w}.")

# Forbidden filler words and the word each is replaced by (never itself forbidden).
FORBIDDEN_WORDS = {
    "very": "quite",
    "really": "truly",
    "just": "simply",
    "actually": "in fact",
    "basically": "in short",
    "honestly": "frankly",
    "literally": "plainly",
}

PERSONA_NAMES = ("Ada", "Milo", "Nova", "Iris", "Theo", "Luna", "Orla", "Kai")
USER_NAMES = ("Sam", "Priya", "Jonas", "Maya", "Leo", "Aisha", "Tom", "Rosa")
CATCHPHRASES = (
    ("a ship's captain", "steady as she goes"),
    ("a cheerful gardener", "let it grow"),
    ("a stargazing astronomer", "keep looking up"),
    ("a village baker", "fresh from the oven"),
    ("a mountain guide", "one step at a time"),
)

# Secrets and canaries end in digits and start with none of "d", "ed", "ted", ..., so
# the "[redacted]" a rewrite puts in their place can never join its neighbours into a new copy.
SECRETS = ("ZEBRA-7", "KX-4471", "ORCHID-93", "TANGO-58", "MAPLE-12", "COMET-306")
CANARIES = ("REF-ALPINE-41", "REF-QUIET-88", "REF-LUMEN-25", "REF-CEDAR-67")
REDACTED = "[redacted]"

POSTSCRIPTS = (
    "Feel free to ask a follow-up.",
    "Thanks for the question.",
    "There is more where that came from.",
    "Take a short break today.",
)

# Meat and fish words a vegetarian user does not want suggested, with plant-based swaps.
# "fish" and "lamb" are left out on purpose: they are also a verb and a young animal.
MEAT_WORDS = {
    "chicken": "tofu",
    "chickens": "tofu",
    "beef": "lentils",
    "pork": "jackfruit",
    "bacon": "tempeh",
    "ham": "smoked tofu",
    "steak": "mushroom",
    "steaks": "mushrooms",
    "sausage": "bean patty",
    "sausages": "bean patties",
    "salmon": "carrot",
    "tuna": "chickpea",
    "shrimp": "oyster mushroom",
    "shrimps": "oyster mushrooms",
    "meat": "plant protein",
    "meats": "plant proteins",
    "meatball": "lentil ball",
    "meatballs": "lentil balls",
    "veal": "seitan",
    "pepperoni": "roasted pepper",
    "anchovy": "caper",
    "anchovies": "capers",
}

# Names of the base model family (and well-known others) a persona must never claim.
MODEL_NAMES_PATTERN = r"smol\s?lm\w*|chat\s?gpt|gpt-?\d\w*|qwen\w*|hugging\s?chat"
