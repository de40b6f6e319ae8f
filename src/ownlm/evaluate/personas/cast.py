"""The three fictional users of the persona fixtures, as plain data (`ownlm.evaluate.personas.fixtures` builds `Persona`s from it).

Everything here is invented for ownlm's tests and demo. The personas differ on every axis a personalization
score looks at, so that a model trained on one can be told apart from the base and from the other two:

- mira:   a vegan bicycle mechanic in Tampere; answers tersely, all lowercase, signing off "— ok".
- bram:   a pescatarian harbour pilot in Rotterdam; every answer opens with "Ahoy!" and uses metric units only.
- chiara: a gluten-free chemistry teacher in Valparaíso; answers as a numbered list and ends with a question.

`accept` lists the spellings a fact check accepts in a model's answer (case-insensitive substrings), e.g. a
model may drop the accent of "Valparaíso" or shorten "bicycle mechanic" to "mechanic".

Topic tips are written in plain metric prose; each persona's style renderer turns them into its own voice.
"""

from __future__ import annotations

CAST: list[dict] = [
    {
        "name": "mira",
        "style": "terse",
        # Short answers, longer sessions: this user fires off several quick questions in a row.
        "turns": {1: 20, 2: 30, 3: 30, 4: 20},
        "facts": {
            "name": "Mira",
            "city": "Tampere",
            "job": "bicycle mechanic",
            "pet_kind": "cat",
            "pet_name": "Pippuri",
            "language": "Rust",
            "diet": "vegan",
            "hobby": "winter swimming",
            "market": "the Kauppahalli market hall",
        },
        "accept": {
            "name": ["mira"],
            "city": ["tampere"],
            "job": ["mechanic", "bike repair", "bicycle repair"],
            "pet_name": ["pippuri"],
            "language": ["rust"],
            "diet": ["vegan", "plant-based"],
            "hobby": ["winter swim", "ice swim", "ice hole", "avanto"],
        },
        "topics": {
            "bike repair": {
                "vocabulary": ["chain", "derailleur", "spokes", "brake pads", "tyre", "cassette"],
                "subjects": {
                    "a squeaky chain": [
                        "Clean the chain with a rag and degreaser first.",
                        "Add one drop of lube per link, then wipe off the extra.",
                        "If it still squeaks, check chain stretch with a gauge.",
                        "Replace it once it has stretched past 0.5 percent.",
                    ],
                    "true-ing a wobbly wheel": [
                        "Put the wheel in a stand and find the wobble with a zip tie.",
                        "Turn the spoke nipples a quarter turn at a time.",
                        "Check tension on both sides before you ride.",
                        "A wobble over 3 mm usually means a bent rim.",
                    ],
                    "winter tyres": [
                        "Studded tyres at about 2.5 bar grip best on ice.",
                        "Swap them on once nights stay below 0 °C.",
                        "Rinse the salt off the rims every week.",
                        "Keep a spare tube in your bag; cold rubber tears.",
                    ],
                },
            },
            "rust programming": {
                "vocabulary": ["borrow checker", "cargo", "lifetimes", "traits", "clippy", "crates"],
                "subjects": {
                    "fighting the borrow checker": [
                        "Clone once at the edge instead of borrowing everywhere.",
                        "Split the struct so two borrows touch different fields.",
                        "Read the compiler's suggestion line; it is usually right.",
                        "Prefer owned data in structs until the design settles.",
                    ],
                    "error handling": [
                        "Return Result and use the question-mark operator.",
                        "Make one error enum per crate with thiserror.",
                        "Keep unwrap for tests and examples only.",
                        "Add context with anyhow in the binary, not the library.",
                    ],
                    "a slow cargo build": [
                        "Turn on incremental builds and a faster linker.",
                        "Split the big crate into a small workspace.",
                        "Run cargo check while editing instead of a full build.",
                        "Trim features you don't use from heavy dependencies.",
                    ],
                },
            },
            "sauna": {
                "vocabulary": ["löyly", "kiuas", "vihta", "ice hole", "cold plunge", "bench"],
                "subjects": {
                    "a first sauna evening for guests": [
                        "Heat the sauna to about 75 °C, not hotter.",
                        "Throw small ladles of water on the stones for soft löyly.",
                        "Offer water and a cool-down break every 10 minutes.",
                        "Tell them to leave the moment they feel dizzy.",
                    ],
                    "cold plunges after the sauna": [
                        "Get in slowly and breathe out long.",
                        "Stay in the water 30 seconds at most at first.",
                        "Warm up again on the lower bench afterwards.",
                        "Never swim alone in the ice hole.",
                    ],
                    "making a birch vihta": [
                        "Cut young birch twigs in early summer.",
                        "Tie about 40 twigs tightly at the handle.",
                        "Soak it in warm water for 10 minutes before use.",
                        "Dry spare ones in the shade and freeze the rest.",
                    ],
                },
            },
        },
    },
    {
        "name": "bram",
        "style": "ahoy",
        "facts": {
            "name": "Bram",
            "city": "Rotterdam",
            "job": "harbour pilot",
            "pet_kind": "dog",
            "pet_name": "Anker",
            "language": "Python",
            "diet": "pescatarian",
            "hobby": "dinghy sailing",
            "market": "the Markthal",
        },
        "accept": {
            "name": ["bram"],
            "city": ["rotterdam"],
            "job": ["pilot"],
            "pet_name": ["anker"],
            "language": ["python"],
            "diet": ["pescatarian", "fish and seafood", "no meat"],
            "hobby": ["sail", "dinghy"],
        },
        "topics": {
            "sailing": {
                "vocabulary": ["tack", "jib", "boom", "reef", "knots", "mainsail"],
                "subjects": {
                    "reefing the mainsail": [
                        "Reef early, before the wind passes 20 km/h gusts.",
                        "Ease the mainsheet, drop the halyard and hook the reef point.",
                        "Tie the reef lines around the boom, not the sail.",
                        "Practise it on a calm day first.",
                    ],
                    "a clean tack": [
                        "Call the tack and push the tiller away smoothly.",
                        "Cross the boat low while the boom swings over.",
                        "Sheet in the jib on the new side within 2 seconds.",
                        "Keep your weight low and central through the turn.",
                    ],
                    "picking a first dinghy": [
                        "A 4 m boat with one sail is easiest to learn on.",
                        "Check the hull for soft spots and the mast step for cracks.",
                        "Budget for a trolley; a 60 kg hull is hard to drag.",
                        "Join a club that rents boats before you buy.",
                    ],
                },
            },
            "tides and weather": {
                "vocabulary": ["high water", "ebb", "flood", "wind shift", "forecast", "current"],
                "subjects": {
                    "reading a tide table": [
                        "Find high water for the day and note the height in metres.",
                        "The current runs strongest halfway between high and low.",
                        "Plan to sail with the ebb, not against it.",
                        "Keep at least 30 cm of water under the keel as a margin.",
                    ],
                    "fog on the river": [
                        "Slow to 5 km/h and sound your horn every 2 minutes.",
                        "Keep to the starboard side of the channel.",
                        "Trust the radar and the VHF over your eyes.",
                        "Post a lookout at the bow if you have crew.",
                    ],
                    "a gusty forecast": [
                        "Gusts above 40 km/h mean a reefed sail or a day ashore.",
                        "Watch the water upwind; dark patches are gusts coming.",
                        "Stay within 1 km of the club when it is this gusty.",
                        "Tell someone ashore your route and return time.",
                    ],
                },
            },
            "sourdough baking": {
                "vocabulary": ["starter", "levain", "crumb", "proof", "scoring", "hydration"],
                "subjects": {
                    "a sluggish starter": [
                        "Feed it equal weights, say 50 g flour and 50 g water.",
                        "Keep it near 25 °C; cold kitchens slow it down.",
                        "Use it when it has doubled, about 6 hours after feeding.",
                        "Rye flour wakes a tired starter up fast.",
                    ],
                    "a dense crumb": [
                        "Let the bulk proof run until the dough grows by half.",
                        "Try 75 percent hydration, 375 g water to 500 g flour.",
                        "Bake at 240 °C with steam for the first 20 minutes.",
                        "Shape the loaf tightly so it holds the gas.",
                    ],
                    "scoring the loaf": [
                        "Use a sharp blade at a shallow 30 degree angle.",
                        "Cut about 1 cm deep in one confident stroke.",
                        "Score straight from the fridge; cold dough cuts cleaner.",
                        "One long cut down the middle gives a classic ear.",
                    ],
                },
            },
        },
    },
    {
        "name": "chiara",
        "style": "listq",
        "facts": {
            "name": "Chiara",
            "city": "Valparaíso",
            "job": "chemistry teacher",
            "pet_kind": "tortoise",
            "pet_name": "Tesoro",
            "language": "Julia",
            "diet": "gluten-free",
            "hobby": "stargazing",
            "market": "the Mercado Cardonal",
        },
        "accept": {
            "name": ["chiara"],
            "city": ["valparaíso", "valparaiso"],
            "job": ["chemistry teacher", "teacher", "teach chemistry", "teaches chemistry"],
            "pet_name": ["tesoro"],
            "language": ["julia"],
            "diet": ["gluten-free", "gluten free", "no gluten", "coeliac", "celiac"],
            "hobby": ["stargaz", "telescope", "astronom", "night sky"],
        },
        "topics": {
            "astronomy": {
                "vocabulary": ["telescope", "nebula", "Southern Cross", "eyepiece", "dark sky",
                               "Magellanic Clouds"],
                "subjects": {
                    "spotting the Magellanic Clouds": [
                        "Go somewhere dark, away from the port lights.",
                        "Look south, below the Southern Cross, on a moonless night.",
                        "Let your eyes adapt for 20 minutes first.",
                        "Binoculars show them well; no telescope needed.",
                    ],
                    "choosing an eyepiece": [
                        "Start with a 25 mm eyepiece for wide views.",
                        "Add a 10 mm one for planets on steady nights.",
                        "Skip cheap zoom eyepieces; the image goes soft.",
                        "Check that the barrel size matches your focuser.",
                    ],
                    "photographing the Milky Way": [
                        "Use a tripod and a wide lens near f/2.8.",
                        "Keep exposures under 20 seconds to avoid star trails.",
                        "Shoot in raw and fix the colour later.",
                        "Focus manually on a bright star first.",
                    ],
                },
            },
            "teaching chemistry": {
                "vocabulary": ["titration", "moles", "lab safety", "periodic table", "reaction", "pH"],
                "subjects": {
                    "explaining moles to teenagers": [
                        "Compare a mole to a dozen, just a much bigger count.",
                        "Weigh out 18 g of water to show one mole you can hold.",
                        "Let them convert grams to moles in pairs.",
                        "Link it to a recipe they already know.",
                    ],
                    "a safe titration lab": [
                        "Goggles on before any bottle is opened.",
                        "Use 0.1 molar solutions, never stronger, for first labs.",
                        "Keep a spill kit and running water within 3 m.",
                        "Practise reading the burette at eye level.",
                    ],
                    "keeping a class focused after lunch": [
                        "Open with a quick demo, like a colour-change reaction.",
                        "Switch activity every 15 minutes.",
                        "Give each table a small role in the experiment.",
                        "End with a one-question exit ticket.",
                    ],
                },
            },
            "gardening": {
                "vocabulary": ["seedlings", "compost", "terrace", "watering", "succulents", "mulch"],
                "subjects": {
                    "a windy hillside terrace": [
                        "Pick low, tough plants like succulents and thyme.",
                        "Put up a mesh windbreak about 1 m high.",
                        "Water early in the morning, before the wind picks up.",
                        "Use heavy clay pots so nothing tips over.",
                    ],
                    "starting compost": [
                        "Mix green scraps and dry leaves about one to two.",
                        "Turn the pile every 2 weeks.",
                        "Keep it as damp as a wrung-out sponge.",
                        "Skip meat and dairy scraps; they attract pests.",
                    ],
                    "plants that are safe for a tortoise": [
                        "Dandelions, clover and hibiscus are all safe to graze.",
                        "Avoid azaleas and anything sprayed.",
                        "Grow a small patch just for grazing.",
                        "Wash the leaves before serving them.",
                    ],
                },
            },
        },
    },
]
