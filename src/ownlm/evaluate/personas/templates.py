"""Templates of the persona fixtures: what users ask and what a personalised answer says (before styling).

Two disjoint sets of template families, so that a personalization score measures generalisation:

TRAIN-ONLY families (used by `ownlm.evaluate.personas.fixtures.generate` to write training conversations):
  fact_recall   direct questions about one fact ("remind me, what's my cat called?")
  fact_use      tasks whose right answer uses the facts: cook, weekend, code, intro, pet
  topic_chat    advice in the persona's recurring topics ("got any advice on a squeaky chain?")
  generic       everyday questions anyone could ask, answered in the persona's style
  units         quantity questions (imperial in, metric out)
  connectors / thanks   glue for multi-turn conversations

PROBE-ONLY families (used by `ownlm.evaluate.personas.fixtures.probes`; never seen in training):
  fact_probe    indirect framings of the same facts ("my neighbour is feeding my dog: what name do they call?")
  style_probe   everyday questions from a separate pool
  unit_probe    quantity questions phrased differently (for personas whose style demands metric units)

Answers are lists of plain points; `ownlm.evaluate.personas.fixtures` renders them in each persona's style. A point may use the
persona's facts ({name}, {city}, {job}, {pet_kind}, {pet_name}, {language}, {diet}, {hobby}, {market}) and
the per-persona extras ({dish}, {ingredient}, {pet_tip}). `back` holds questions that the "ends with a question"
style can ask in return. tests/test_personas.py checks that no probe question, nor any five-word run of one,
appears in the training data.
"""

from __future__ import annotations

# ---------------------------------------------------------------- TRAIN-ONLY

FACT_RECALL: dict[str, dict[str, list]] = {
    "name": {
        "ask": ["do you remember my name?", "what do you call me?", "say my name so I know you know it.",
                "who am I, according to you?"],
        "answer": [["You're {name}.", "{name}, the {job} from {city}.",
                    "Owner of {pet_name}, fan of {language}."],
                   ["I call you {name}.", "That's what you asked me to use.", "Short and easy to remember."]],
        "back": ["Want me to use a nickname instead?", "Should I keep calling you that?"],
    },
    "city": {
        "ask": ["where do I live again?", "which city am I in?", "remind me which town I call home.",
                "what city is home for me?"],
        "answer": [["You live in {city}.", "You shop at {market} there.", "{pet_name} lives there with you."],
                   ["Home is {city}.", "That's where you work as a {job}.", "You go {hobby} nearby."]],
        "back": ["Planning a trip away from it?", "Need anything local?"],
    },
    "job": {
        "ask": ["remind me what my job is.", "what's my line of work?", "how do I earn a living?",
                "what's my job title, roughly?"],
        "answer": [["You're a {job}.", "You work in {city}.", "You unwind with {hobby} afterwards."],
                   ["You work as a {job}.", "You told me you enjoy it most days.",
                    "The hours leave room for {hobby}."]],
        "back": ["Thinking about a change?", "Updating your CV?"],
    },
    "pet_name": {
        "ask": ["remind me, what's my {pet_kind} called?", "what's my {pet_kind}'s name?",
                "what did I name my {pet_kind}?", "who's waiting for me at home?"],
        "answer": [["Your {pet_kind} is called {pet_name}.", "{pet_name} lives with you in {city}.",
                    "You adopted your {pet_kind} a few years ago."],
                   ["{pet_name}, your {pet_kind}.", "Hard to forget that name.",
                    "{pet_name} is part of the family."]],
        "back": ["How is {pet_name} doing?", "Need a reminder for the vet?"],
    },
    "language": {
        "ask": ["what's my favourite programming language?", "which language do I like coding in?",
                "what do I usually write code in?", "name the language I always reach for."],
        "answer": [["{language} is your favourite.", "You use it for most side projects.",
                    "You reach for it before anything else."],
                   ["You like coding in {language}.", "You say it keeps you honest.",
                    "You'd pick it for a new project too."]],
        "back": ["Starting something new in it?", "Want a tip for it?"],
    },
    "diet": {
        "ask": ["remind me of my dietary preference.", "what do I eat, diet-wise?",
                "is there anything I don't eat?", "how would you describe my diet?"],
        "answer": [["You're {diet}.", "So I plan meals around that.", "Recipes I suggest always fit it."],
                   ["You eat {diet}.", "You buy most food at {market}.", "In {city} that's easy enough."]],
        "back": ["Want a recipe that fits?", "Planning a meal?"],
    },
    "hobby": {
        "ask": ["what do I do for fun?", "what's my hobby again?", "remind me what I'm into.",
                "what do I spend my spare time on?"],
        "answer": [["You love {hobby}.", "Usually near {city}.", "It's how you unwind after work."],
                   ["{hobby}, mostly.", "You try to fit it in every week.",
                    "Sometimes with friends, sometimes alone."]],
        "back": ["Going this week?", "Need gear advice?"],
    },
}

FACT_USE: dict[str, dict[str, list]] = {
    "cook": {
        "ask": ["what should I cook tonight?", "dinner ideas?", "I'm hungry, what can I make?",
                "suggest a quick supper.", "what's a good thing to cook this evening?"],
        "answer": [["Make {dish}; it's {diet}.", "Pick up {ingredient} at {market} in {city}.",
                    "It takes about 30 minutes."],
                   ["How about {dish}?", "It suits your {diet} diet.",
                    "{market} has good {ingredient} this week."]],
        "back": ["Want the full recipe?", "Cooking for guests too?"],
    },
    "weekend": {
        "ask": ["any ideas for the weekend?", "what should I do on saturday?",
                "I've got a free sunday, suggestions?", "plan my weekend, please."],
        "answer": [["Make time for {hobby}.", "Then walk around {city} for an hour.",
                    "Give {pet_name} a treat after."],
                   ["Go {hobby} in the morning.", "Have lunch near {market}.", "Keep the evening quiet."]],
        "back": ["Want a rainy-day backup plan?", "Should I check the weather?"],
    },
    "code": {
        "ask": ["I need to write a small command-line tool, what should I use?",
                "help me choose a stack for a weekend project.", "what language for a quick script?"],
        "answer": [["Use {language}; it's your favourite.", "Keep it to one file at first.",
                    "Add tests once it works."],
                   ["{language}, as usual.", "You know its tooling well.", "Start with the smallest version."]],
        "back": ["Want a starter layout?", "Does it need a web page?"],
    },
    "intro": {
        "ask": ["write a one-line intro about me for a meetup.", "help me introduce myself at a party.",
                "give me a short bio for a club newsletter."],
        "answer": [["Hi, I'm {name}, a {job} in {city}.", "Mention {hobby} to break the ice.",
                    "Keep it to one breath."],
                   ["{name}: {job}, {city}.", "Into {hobby} and {language}.",
                    "Owner of a {pet_kind} called {pet_name}."]],
        "back": ["Want a longer version?", "Is it formal or casual?"],
    },
    "pet": {
        "ask": ["my {pet_kind} seems bored, ideas?", "how do I keep my {pet_kind} happy on a rainy day?",
                "any care tips for my {pet_kind} this week?"],
        "answer": [["Give {pet_name} {pet_tip}.", "Keep a routine; {pet_name} likes that.",
                    "A yearly vet check keeps {pet_name} healthy."],
                   ["Try {pet_tip} for {pet_name}.", "Check water and food twice a day.",
                    "Watch for changes in appetite."]],
        "back": ["Want a vet checklist?", "Is {pet_name} eating well?"],
    },
}

# Per-persona extras used by FACT_USE, keyed by the fact they depend on.
DISHES = {
    "vegan": ["a chickpea curry", "lentil soup with rye bread", "a tofu and kale stir-fry",
              "mushroom barley risotto"],
    "pescatarian": ["grilled mackerel with potatoes", "a shrimp and pea risotto", "herring on rye",
                    "baked cod with leeks"],
    "gluten-free": ["a quinoa and avocado bowl", "rice with black beans and grilled corn", "a potato tortilla",
                    "corn pie with a polenta crust"],
}
INGREDIENTS = {
    "vegan": ["kale", "mushrooms", "beetroot", "fresh dill"],
    "pescatarian": ["fresh fish", "shrimp", "leeks", "new potatoes"],
    "gluten-free": ["avocados", "corn", "quinoa", "tomatoes"],
}
PET_TIPS = {
    "cat": ["a cardboard box and 10 minutes of string play", "a sunny window perch", "a new scratching post"],
    "dog": ["a 3 km walk and a sniff game", "a frozen carrot to chew", "a short training session"],
    "tortoise": ["a warm basking spot near 30 °C", "fresh dandelion leaves", "a shallow lukewarm bath"],
}

TOPIC_ASK = ["got any advice on {subject}?", "I'm dealing with {subject} again, ideas?",
             "quick one about {subject}: where do I start?", "how do I handle {subject}?",
             "tips for {subject}, please.", "what's your take on {subject}?"]
TOPIC_BACK = ["Want more on {topic}?", "Shall I go deeper on that?", "Did that help with {subject}?"]

# Everyday questions with three short points each and a question back.
GENERIC: list[dict] = [
    {"q": "how do I boil an egg?", "back": "Soft or hard today?",
     "points": ["Lower the egg into boiling water.", "Cook 7 minutes for a jammy yolk, 10 for hard.",
                "Cool it in cold water before peeling.", "Older eggs peel more easily than very fresh ones."]},
    {"q": "how can I sleep better?", "back": "Is it falling asleep or staying asleep?",
     "points": ["Keep the same bedtime every night.", "No screens for 30 minutes before bed.",
                "Keep the bedroom cool, around 18 °C.", "Get some daylight within an hour of waking up."]},
    {"q": "how do I make a strong password?", "back": "Do you use a manager already?",
     "points": ["Use four or more random words.", "Never reuse it on another site.",
                "Let a password manager store it.", "Turn on two-factor login for email and banking."]},
    {"q": "what's a good way to start running?", "back": "Road or trail?",
     "points": ["Alternate 1 minute running and 2 minutes walking.", "Go three times a week.",
                "Add a little time each week, not more.", "Good shoes matter more than fancy clothes."]},
    {"q": "how do I keep houseplants alive?", "back": "Which plant is struggling?",
     "points": ["Water only when the top 2 cm of soil is dry.", "Give them bright, indirect light.",
                "Pots need drainage holes.", "Wipe the dust off the leaves once a month."]},
    {"q": "how should I prepare for a job interview?", "back": "Is it in person or online?",
     "points": ["Read up on the company.", "Prepare three stories about your work.",
                "Have two questions ready for them.", "Arrive 10 minutes early and bring a printed CV."]},
    {"q": "how do I focus when working from home?", "back": "What distracts you most?",
     "points": ["Work in 25-minute blocks.", "Keep the phone in another room.", "Set a fixed end time.",
                "Get dressed as if you were going out."]},
    {"q": "what's the best way to learn a new language?", "back": "Which language is it?",
     "points": ["Practise 15 minutes every day.", "Speak from week one, even badly.",
                "Learn the 500 most common words first.",
                "Watch shows you like with subtitles in that language."]},
    {"q": "how do I clean a cast-iron pan?", "back": "Is there rust on it?",
     "points": ["Rinse it with hot water and a brush.", "Dry it on the hob.", "Rub in a thin film of oil.",
                "Skip long soaks; they cause rust."]},
    {"q": "how can I save money on groceries?", "back": "Want a sample plan?",
     "points": ["Plan meals for the week.", "Shop with a list.", "Buy seasonal produce.",
                "Cook double and freeze half."]},
    {"q": "what should I pack for a weekend trip?", "back": "Where are you going?",
     "points": ["Two outfits and one warm layer.", "Charger, documents and medicine.",
                "A 1 litre water bottle.", "Roll clothes instead of folding them to save space."]},
    {"q": "how do I write a polite complaint email?", "back": "Want me to draft it?",
     "points": ["State the problem in one sentence.", "Say what you want them to do.",
                "Keep it calm and short.", "Attach the order number and any photos."]},
    {"q": "how do I stop procrastinating?", "back": "What are you putting off?",
     "points": ["Start with a 5-minute task.", "Make the first step tiny.", "Reward yourself after.",
                "Work next to someone else who is working."]},
    {"q": "how do I back up my photos?", "back": "Phone or camera photos?",
     "points": ["Keep three copies.", "Use two kinds of storage.", "Keep one copy in another place.",
                "Test a restore twice a year."]},
    {"q": "how much water should I drink?", "back": "Are you often thirsty?",
     "points": ["Around 2 litres a day suits most adults.", "More when it's hot or you exercise.",
                "Pale urine means you're fine.", "Keep a bottle on your desk as a reminder."]},
    {"q": "how do I get rid of fruit flies?", "back": "Where do they gather?",
     "points": ["Put out a cup of vinegar with a drop of soap.", "Take out the compost daily.",
                "Keep fruit in the fridge.", "Rinse bottles and jars before recycling them."]},
    {"q": "how can I make my mornings less rushed?", "back": "What takes the longest?",
     "points": ["Pack your bag the night before.", "Set out clothes.", "Wake up 15 minutes earlier.",
                "Make breakfast something you can grab."]},
    {"q": "how do I fix a slow laptop?", "back": "How old is it?",
     "points": ["Close apps you don't use.", "Free up 10 GB of disk space.", "Restart it once a week.",
                "Check which apps start automatically at login."]},
    {"q": "what's a quick stretch for a stiff back?", "back": "Lower or upper back?",
     "points": ["Do a cat-cow stretch for 1 minute.", "Hug your knees lying down.", "Take a 5-minute walk.",
                "Stand up every 30 minutes during desk work."]},
    {"q": "how do I say no to extra work politely?", "back": "Is it your manager asking?",
     "points": ["Thank them for asking.", "Explain what you're already doing.", "Offer a later date.",
                "Keep it short; long excuses invite bargaining."]},
    {"q": "how do I remember people's names?", "back": "Is there an event coming up?",
     "points": ["Repeat the name when you meet.", "Link it to something about them.", "Write it down later.",
                "Use the name once more when you say goodbye."]},
    {"q": "what's an easy way to meditate?", "back": "Want a guided version?",
     "points": ["Sit still for 5 minutes.", "Count ten breaths, then start over.",
                "Don't judge wandering thoughts.", "The same time each day makes it a habit."]},
    {"q": "how do I pick a good avocado?", "back": "Eating it today?",
     "points": ["It should give a little when pressed.", "Check under the stem: green is good.",
                "Avoid very soft ones.", "Ripen hard ones in a paper bag with a banana."]},
    {"q": "how do I keep a to-do list that works?", "back": "Paper or app?",
     "points": ["Write tasks as next actions.", "Pick three for today.", "Review the list every evening.",
                "Move anything older than a month to a someday list."]},
]
GENERIC_WRAP = ["{q}", "quick question: {q}", "hey, {q}", "{q} asking for myself.", "I was wondering, {q}"]

# Quantity questions: the user's units come in imperial, the answer is metric only (the point of the "ahoy"
# style, harmless for the others). {x} is drawn from `values`, {y} is computed by `convert`.
UNITS: list[dict] = [
    {"ask": ["I ran {x} miles today, how far is that?", "is {x} miles a long bike ride?"],
     "values": [3, 5, 8, 12], "convert": ("mul", 1.609, 1), "unit": "km",
     "points": ["That's about {y} km.", "A solid distance for one session.",
                "Stretch afterwards and drink some water."], "back": "Going further next time?"},
    {"ask": ["the recipe wants {x} oz of flour, how much is that?", "how much is {x} ounces of sugar?"],
     "values": [4, 8, 12, 16], "convert": ("mul", 28.35, 0), "unit": "g",
     "points": ["That's about {y} g.", "A kitchen scale makes it exact.",
                "Cups vary too much to be reliable."], "back": "Baking today?"},
    {"ask": ["it's {x}°F outside, is that cold?", "the forecast says {x} Fahrenheit, what do I wear?"],
     "values": [41, 50, 59, 86], "convert": ("f2c", 0, 0), "unit": "°C",
     "points": ["That's about {y} °C.", "Check the wind too; it changes how warm it feels.",
                "Take a light layer just in case."], "back": "Going out for long?"},
]

# A personal aside that some answers end with: keeps the facts recurring in everyday chats, as they would
# with an assistant that knows its user (and makes them learnable from more than the direct questions).
ASIDES = ["Say hi to {pet_name} for me.", "Should be easy to find in {city}.",
          "Easy to fit around your work as a {job}.", "It still leaves time for {hobby}.",
          "Good luck, {name}.", "{market} should have what you need."]

OPENERS = ["Long day. ", "Sorry, random one: ", "Morning! ", "Before I forget: ", "Okay, so ", "Hi again. "]
CONNECTORS = ["also, ", "one more thing: ", "different question: ", "thanks. next: ", "ok, and "]
THANKS = {"ask": ["thanks!", "great, thank you.", "cheers, that helps.", "perfect, thanks."],
          "points": ["Anytime.", "Ask again whenever you need."], "back": "Anything else for today?"}

# ---------------------------------------------------------------- PROBE-ONLY

FACT_PROBES: list[tuple[str, str]] = [
    ("name", "If someone at reception asks who you are helping today, what name do you give?"),
    ("name", "Sign this birthday card for me with my first name."),
    ("city", "Which city's weather should you check for me each morning?"),
    ("city", "A parcel is being sent to me; which city goes on the label?"),
    ("job", "Describe my profession to a new colleague in one sentence."),
    ("pet_name", "My neighbour is feeding my {pet_kind} while I'm away; what name should they call out?"),
    ("language", "I'm starting a new side project on Monday. Which programming language would I enjoy most?"),
    ("diet", "I'm filling in a restaurant booking form. What goes under dietary requirements?"),
    ("hobby", "I have a free afternoon. What would I probably love to spend it on?"),
]

STYLE_PROBES: list[str] = [
    "What is a sensible way to learn to juggle?",
    "How should I store fresh herbs so they last?",
    "Explain why the sky looks blue.",
    "Recommend a way to organise my email inbox.",
    "What should I bring to a picnic?",
    "How do I make my handwriting neater?",
    "Give me advice for my first day at a new gym.",
    "Why do onions make people cry?",
]

UNIT_PROBES: list[str] = [
    "My grandmother's recipe says two cups of milk and an oven at 350 degrees. What does that mean for me?",
    "How tall is someone who is six feet?",
    "The trail guide says the hike is 10 miles with a 2,000 foot climb. Is that hard?",
]
