"""Generate the shipped verifiable-instruction dataset in ``reward_data/``.

Usage::

    python reward_data/generate.py            # rewrite the files next to this script
    python reward_data/generate.py --out DIR  # write them somewhere else

Standard library only, fully seeded: rerunning reproduces byte-identical files.
Every prompt is a TOPIC request plus one or two verifiable instructions (see
``align/judges.py``). Compliant responses are assembled from hand-written
factual sentences and transformed to satisfy the constraints; rejected
responses are near misses that break (usually exactly) one constraint. Both are
checked with ``align.judges``: every chosen/SFT response passes ``judge`` and
every rejected response fails it, or generation aborts.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from itertools import combinations
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from align.judges import check, describe, judge  # noqa: E402

SEED = 20240611
MAX_TOTAL_WORDS = 110  # prompt + response, whitespace-split
MAX_TOTAL_CHARS = 680  # prompt + response (roughly 170 tokens at worst)

COUNTS = {
    "sft_train": 2200,
    "pairs_train": 2200,
    "prompts_train": 1200,
    "pairs_test": 400,
    "prompts_test": 400,
}
TINY = 32

# --------------------------------------------------------------------------- #
# Topics: hand-written factual sentences. The first sentence of every topic
# starts with a common (non-proper) word so it can follow a "Start with" word.
# --------------------------------------------------------------------------- #
TRAIN_TOPICS: dict[str, list[str]] = {
    "the water cycle": [
        "The water cycle describes how water moves between the oceans, the air and the land.",
        "Heat from the sun makes water evaporate from seas, lakes and rivers.",
        "As the vapour rises it cools and condenses into tiny droplets that form clouds.",
        "When the droplets grow heavy enough they fall back to the ground as rain or snow.",
        "Some of that water soaks into the soil and refills underground aquifers.",
        "The rest flows through streams and rivers until it returns to the sea.",
    ],
    "how bees make honey": [
        "Honey bees make honey from the sweet nectar they collect from flowers.",
        "A forager sucks up nectar with its long tongue and stores it in a special stomach.",
        "Back at the hive, worker bees pass the nectar from mouth to mouth, adding enzymes.",
        "The enzymes break complex sugars into simpler ones that do not spoil easily.",
        "Bees then fan the cells with their wings to evaporate most of the water.",
        "Finally they seal each cell with a cap of beeswax to keep the honey fresh.",
    ],
    "the history of the bicycle": [
        "The first bicycles appeared in Europe in the early nineteenth century.",
        "Early models, called draisines, had no pedals and riders pushed them with their feet.",
        "Pedals attached to the front wheel arrived in France during the 1860s.",
        "The high-wheeled penny-farthing was fast but dangerous to ride.",
        "The safety bicycle of the 1880s introduced a chain drive and two equal wheels.",
        "Pneumatic tyres soon followed, making cycling far more comfortable.",
    ],
    "photosynthesis": [
        "Photosynthesis is the process plants use to turn light into chemical energy.",
        "It takes place mainly in the leaves, inside tiny structures called chloroplasts.",
        "Chlorophyll, the green pigment, absorbs sunlight to power the reaction.",
        "Plants combine carbon dioxide from the air with water drawn up from their roots.",
        "The reaction produces glucose, which the plant uses for energy and growth.",
        "Oxygen is released as a by-product, which is why forests matter for clean air.",
    ],
    "how volcanoes form": [
        "Volcanoes form where molten rock from deep inside the Earth reaches the surface.",
        "Most of them sit along the edges of tectonic plates.",
        "Where one plate slides beneath another, the sinking rock melts and creates magma.",
        "Because magma is lighter than the rock around it, it rises through cracks in the crust.",
        "Repeated eruptions pile up lava and ash, slowly building a mountain.",
        "Some volcanoes, like those in Hawaii, form over hot spots far from plate boundaries.",
    ],
    "the invention of the printing press": [
        "The printing press with movable type was developed by Johannes Gutenberg around 1440.",
        "Before it, books in Europe were copied slowly by hand.",
        "Gutenberg used metal letters that could be arranged, inked and reused.",
        "His press could produce hundreds of pages a day.",
        "Books became cheaper, and literacy spread across the continent.",
        "The new technology helped fuel the Reformation and the scientific revolution.",
    ],
    "how vaccines work": [
        "Vaccines train the immune system to recognise a germ before it causes illness.",
        "They contain a weakened, inactivated or partial version of a pathogen.",
        "The body responds by making antibodies and memory cells.",
        "If the real germ appears later, the immune system reacts quickly and strongly.",
        "This often stops the infection before symptoms develop.",
        "When enough people are vaccinated, even those who are not gain some protection.",
    ],
    "the life cycle of a butterfly": [
        "A butterfly goes through four stages: egg, larva, pupa and adult.",
        "The female lays tiny eggs on a plant that the caterpillars can eat.",
        "After hatching, the caterpillar spends its days eating and growing.",
        "It sheds its skin several times as it gets bigger.",
        "Then it forms a chrysalis, where its body is completely reorganised.",
        "Weeks later, an adult butterfly emerges, dries its wings and flies away.",
    ],
    "how rainbows form": [
        "A rainbow appears when sunlight shines through drops of water in the air.",
        "Each drop bends the light as it enters, a process called refraction.",
        "Different colours bend by slightly different amounts, so the light spreads out.",
        "The light reflects off the back of the drop and bends again as it leaves.",
        "This sends red light to our eyes at a slightly higher angle than violet light.",
        "To see a rainbow, you must stand with the sun behind you.",
    ],
    "the Great Wall of China": [
        "The Great Wall of China is a series of fortifications across northern China.",
        "Its earliest sections were built more than two thousand years ago.",
        "Most of the wall that survives today dates from the Ming dynasty.",
        "Builders used earth, wood, brick and stone, depending on the local materials.",
        "Watchtowers along the wall let soldiers send signals with smoke and fire.",
        "Today the wall is a World Heritage Site visited by millions of tourists.",
    ],
    "how the heart works": [
        "The heart is a muscular pump about the size of a fist.",
        "It has four chambers: two atria on top and two ventricles below.",
        "The right side pumps blood to the lungs to collect oxygen.",
        "The left side pumps oxygen-rich blood out to the rest of the body.",
        "Valves between the chambers stop the blood from flowing backwards.",
        "An adult heart beats roughly one hundred thousand times every day.",
    ],
    "why leaves change colour in autumn": [
        "Leaves are green in summer because they are full of chlorophyll.",
        "As days get shorter in autumn, trees stop making new chlorophyll.",
        "The green fades and reveals yellow and orange pigments that were there all along.",
        "Some trees also produce red pigments called anthocyanins.",
        "Cool, sunny days and chilly nights make these colours especially bright.",
        "Eventually the tree seals off each leaf, and it falls to the ground.",
    ],
    "how airplanes fly": [
        "Airplanes fly because their wings create lift as air flows over them.",
        "A wing is shaped and tilted so that it pushes air downwards.",
        "In return, the air pushes the wing upwards.",
        "Engines provide thrust, which moves the plane forward fast enough to generate lift.",
        "Drag from the air and the weight of the plane work against flight.",
        "Pilots adjust the flaps, rudder and elevators to control the aircraft.",
    ],
    "the discovery of penicillin": [
        "Penicillin was discovered by accident in 1928 by Alexander Fleming.",
        "Fleming noticed that mould had contaminated one of his bacterial cultures.",
        "Around the mould, the bacteria had been killed.",
        "More than a decade later, Howard Florey and Ernst Chain found a way to purify it.",
        "Mass production during the Second World War saved countless soldiers.",
        "Penicillin became the first widely used antibiotic.",
    ],
    "how tides work": [
        "Tides are the regular rise and fall of the sea along the coast.",
        "They are caused mainly by the gravitational pull of the moon.",
        "The moon pulls the ocean into a bulge on the side of the Earth facing it.",
        "A second bulge forms on the opposite side, so most coasts get two high tides a day.",
        "The sun also affects tides, though less strongly than the moon.",
        "When the sun and moon line up, extra high spring tides occur.",
    ],
    "the Roman aqueducts": [
        "The ancient Romans built aqueducts to carry fresh water into their cities.",
        "Most of an aqueduct ran underground in channels cut through rock or built of stone.",
        "The famous arched bridges carried the water across valleys.",
        "Engineers gave each channel a gentle, steady slope so gravity could move the water.",
        "Rome itself was supplied by eleven aqueducts.",
        "The water fed public fountains, baths and the homes of wealthy citizens.",
    ],
    "how coffee is made": [
        "Coffee comes from the seeds of a fruit called the coffee cherry.",
        "Farmers pick the ripe cherries and remove the pulp to free the beans.",
        "The beans are dried, sorted and shipped around the world.",
        "Roasting turns the green beans brown and creates their rich aroma.",
        "The roasted beans are ground just before brewing.",
        "Hot water then extracts the flavour, producing a cup of coffee.",
    ],
    "how the internet works": [
        "The internet is a global network of computers that exchange data.",
        "Information is broken into small packets before it is sent.",
        "Routers pass each packet along the best available path to its destination.",
        "Shared rules called protocols make sure all devices understand each other.",
        "At the destination, the packets are put back together in the right order.",
        "Undersea cables carry most of the traffic between continents.",
    ],
    "the migration of monarch butterflies": [
        "Every autumn, millions of monarch butterflies fly south from Canada and the United States.",
        "Many travel thousands of kilometres to forests in central Mexico.",
        "There they cluster on fir trees to survive the winter.",
        "In spring they head north again and lay eggs on milkweed plants.",
        "The round trip takes several generations to complete.",
        "Scientists believe the butterflies navigate using the sun and the magnetic field.",
    ],
    "how glass is made": [
        "Glass is made mainly from sand, which is rich in silica.",
        "The sand is mixed with soda ash and limestone.",
        "The mixture is heated in a furnace until it melts into a glowing liquid.",
        "While it is hot, the glass can be blown, pressed or poured into shape.",
        "It is then cooled slowly in an oven to remove internal stresses.",
        "Modern window glass is made by floating molten glass on a bath of liquid tin.",
    ],
    "the Olympic Games": [
        "The ancient Olympic Games began in Greece in 776 BC.",
        "They were held every four years at Olympia in honour of Zeus.",
        "Events included running, wrestling and chariot racing.",
        "The modern Games were revived in Athens in 1896.",
        "Today athletes from more than two hundred nations take part.",
        "Separate Winter Games were first held in 1924.",
    ],
    "how earthquakes happen": [
        "Earthquakes happen when rocks underground suddenly break or slip along a fault.",
        "The plates of the crust are always moving, but they often get stuck.",
        "Stress builds up over years until the rocks give way.",
        "The released energy travels through the ground as seismic waves.",
        "Scientists measure the strength of earthquakes with seismometers.",
        "Large earthquakes under the sea can trigger tsunamis.",
    ],
    "the role of mitochondria": [
        "Mitochondria are small structures inside cells that produce energy.",
        "They break down sugars and fats using oxygen.",
        "The energy is stored in a molecule called ATP.",
        "Muscle cells contain many mitochondria because they need lots of energy.",
        "Mitochondria have their own DNA, separate from the cell nucleus.",
        "Scientists think they were once free-living bacteria.",
    ],
    "how chocolate is made": [
        "Chocolate is made from the seeds of the cacao tree.",
        "The seeds are scooped from large pods and left to ferment for several days.",
        "After drying, they are roasted to develop their flavour.",
        "The shells are removed, and the inner nibs are ground into a thick paste.",
        "Sugar, milk and cocoa butter are mixed in to make different kinds of chocolate.",
        "The mixture is tempered and poured into moulds to set.",
    ],
    "the causes of the seasons": [
        "The seasons are caused by the tilt of the axis of the Earth.",
        "The axis is tilted by about twenty-three degrees.",
        "As the Earth orbits the sun, each hemisphere takes turns leaning towards it.",
        "The hemisphere tilted towards the sun gets longer days and more direct sunlight.",
        "That hemisphere has summer while the other has winter.",
        "Distance from the sun plays only a small part.",
    ],
    "how submarines dive": [
        "Submarines dive and surface by changing how much water they carry.",
        "They have large ballast tanks that can be filled with water or air.",
        "Letting seawater into the tanks makes the submarine heavier, so it sinks.",
        "Blowing compressed air into the tanks pushes the water out, and the boat rises.",
        "Small fins called hydroplanes help steer it up or down while moving.",
        "Nuclear submarines can stay underwater for months at a time.",
    ],
    "the history of paper": [
        "Paper was invented in China around two thousand years ago.",
        "Early papermakers used mulberry bark, hemp and old rags.",
        "The fibres were soaked, beaten into pulp and spread on screens to dry.",
        "The technique spread along trade routes to the Islamic world.",
        "From there it reached Europe in the Middle Ages.",
        "In the nineteenth century, machines began making paper from wood pulp.",
    ],
    "how solar panels work": [
        "Solar panels turn sunlight directly into electricity.",
        "They are made of cells that usually contain layers of silicon.",
        "When light hits a cell, it knocks electrons loose from their atoms.",
        "An electric field in the cell pushes these electrons one way, creating a current.",
        "An inverter converts this current into the type used by homes.",
        "Panels work best when they face the sun without shade.",
    ],
    "how ants communicate": [
        "Ants communicate mainly through chemicals called pheromones.",
        "A worker that finds food leaves a scent trail on its way back to the nest.",
        "Other ants follow the trail and reinforce it if the food is still there.",
        "Different pheromones can signal danger, food or the presence of a queen.",
        "Ants also use touch, tapping each other with their antennae.",
        "Some species even make sounds by rubbing parts of their bodies together.",
    ],
    "the formation of the Grand Canyon": [
        "The Grand Canyon was carved mainly by the Colorado River.",
        "Over millions of years, the river cut down through layers of rock.",
        "At the same time, the land around it was slowly lifted up.",
        "Rain, ice and wind widened the canyon walls.",
        "The exposed layers record nearly two billion years of geological history.",
        "Today the canyon is more than a kilometre deep in places.",
    ],
    "how compasses work": [
        "A compass works because the Earth behaves like a giant magnet.",
        "The needle is a small magnet that can spin freely.",
        "Its north end is attracted towards the magnetic north pole.",
        "Magnetic north is not exactly the same place as the geographic pole.",
        "Navigators correct for this difference, called declination.",
        "Compasses were first used for navigation in China about a thousand years ago.",
    ],
    "the history of chess": [
        "Chess is believed to have started in India around the sixth century.",
        "The early game, called chaturanga, spread to Persia and then to the Arab world.",
        "It reached Europe through Spain and Italy.",
        "In the fifteenth century, the queen became the most powerful piece.",
        "The first official world champion was crowned in 1886.",
        "Today millions of people play chess online every day.",
    ],
    "how plastic recycling works": [
        "Plastic recycling begins when used items are collected and taken to a sorting plant.",
        "Machines and workers separate the plastics by type.",
        "The sorted plastic is washed to remove labels, food and dirt.",
        "It is then shredded into small flakes.",
        "The flakes are melted and formed into pellets.",
        "Manufacturers use the pellets to make new bottles, clothing or furniture.",
    ],
    "the human skeleton": [
        "The adult human skeleton has two hundred and six bones.",
        "Babies are born with more bones, but some fuse together as they grow.",
        "The skeleton supports the body and protects organs such as the brain and heart.",
        "Bones also store minerals, especially calcium.",
        "Red marrow inside some bones produces blood cells.",
        "The smallest bone, the stirrup, is found in the middle ear.",
    ],
    "how clouds form": [
        "Clouds form when warm, moist air rises and cools.",
        "Cooler air cannot hold as much water vapour.",
        "The extra vapour condenses onto tiny particles of dust or salt.",
        "Billions of these droplets together make a visible cloud.",
        "High clouds are often made of ice crystals instead of water.",
        "The shape and height of clouds can help forecasters predict the weather.",
    ],
    "the invention of the telephone": [
        "The telephone was patented by Alexander Graham Bell in 1876.",
        "It turned the vibrations of a voice into an electrical signal.",
        "The signal travelled along a wire and was turned back into sound at the other end.",
        "Other inventors, including Elisha Gray, were working on similar ideas.",
        "Telephone exchanges soon connected homes and businesses.",
        "Within decades, long-distance lines linked cities across continents.",
    ],
    "how fish breathe": [
        "Fish breathe by taking oxygen from the water with their gills.",
        "Water enters through the mouth and flows over the gills.",
        "The gills contain thin filaments packed with blood vessels.",
        "Oxygen passes from the water into the blood, and carbon dioxide passes out.",
        "The water then leaves through openings at the sides of the head.",
        "Some fish, such as lungfish, can also gulp air.",
    ],
    "the Silk Road": [
        "The Silk Road was a network of trade routes linking China with the Mediterranean.",
        "It flourished for more than a thousand years.",
        "Merchants carried silk, spices, tea and precious metals.",
        "Ideas, religions and inventions travelled along the routes as well.",
        "Most traders covered only part of the journey, passing goods from city to city.",
        "Sea routes eventually replaced much of the overland trade.",
    ],
    "how bread rises": [
        "Bread rises because of yeast, a tiny living fungus.",
        "When yeast feeds on the sugars in flour, it releases carbon dioxide gas.",
        "Kneading the dough develops gluten, a stretchy network of proteins.",
        "The gluten traps the gas, and the dough swells.",
        "In the oven, the gas expands further before the crust sets.",
        "The heat also kills the yeast, so the bread stops rising.",
    ],
    "the first moon landing": [
        "The first crewed moon landing took place in July 1969.",
        "The Apollo 11 lunar module touched down in the Sea of Tranquillity.",
        "Neil Armstrong became the first person to walk on the lunar surface.",
        "Buzz Aldrin joined him, while Michael Collins stayed in orbit.",
        "The astronauts collected rock samples and set up experiments.",
        "Hundreds of millions of people watched the event on television.",
    ],
    "how batteries store energy": [
        "A battery stores energy in chemical form and releases it as electricity.",
        "Inside are two electrodes separated by an electrolyte.",
        "During use, a chemical reaction sends electrons from one electrode to the other.",
        "The electrons travel through the outside circuit, powering a device.",
        "Rechargeable batteries reverse the reaction when connected to a charger.",
        "Lithium-ion batteries are common because they are light and hold a lot of energy.",
    ],
    "how camels survive in the desert": [
        "Camels are well adapted to life in hot, dry deserts.",
        "Their humps store fat, which can be broken down for energy.",
        "They can drink more than one hundred litres of water in a few minutes.",
        "Their bodies lose very little water through sweat.",
        "Thick eyelashes and closable nostrils keep out blowing sand.",
        "Wide, padded feet stop them from sinking into soft ground.",
    ],
    "how wind turbines generate electricity": [
        "Wind turbines turn the energy of moving air into electricity.",
        "The wind pushes against the blades and makes them spin.",
        "The blades turn a shaft connected to a gearbox.",
        "The gearbox speeds up the rotation to drive a generator.",
        "Sensors turn the turbine so that it faces the wind.",
        "Groups of turbines, called wind farms, can power thousands of homes.",
    ],
    "the Eiffel Tower": [
        "The Eiffel Tower was built for the 1889 World Fair in Paris.",
        "It was designed by the company of the engineer Gustave Eiffel.",
        "At about three hundred metres, it was the tallest structure in the world for decades.",
        "Many artists at first criticised it as ugly.",
        "It was meant to stand for only twenty years.",
        "Its use as a radio antenna helped save it from demolition.",
    ],
    "how owls hunt at night": [
        "Owls are skilled hunters that can find prey in near darkness.",
        "Their large eyes gather as much light as possible.",
        "Their hearing is so sharp that some owls can catch mice under snow.",
        "A disc of feathers on the face funnels sound towards the ears.",
        "Soft, fringed feathers let them fly almost silently.",
        "Strong talons allow them to grip prey tightly.",
    ],
}

TEST_TOPICS: dict[str, list[str]] = {
    "how glaciers shape the land": [
        "Glaciers are huge, slow-moving rivers of ice.",
        "As they flow downhill, they scrape and grind the rock beneath them.",
        "Rocks frozen into the ice act like sandpaper.",
        "Over thousands of years, glaciers carve deep valleys with steep sides.",
        "When the ice melts, it leaves behind piles of rock and gravel called moraines.",
        "Many lakes in northern Europe and North America were formed this way.",
    ],
    "the history of the violin": [
        "The violin developed in northern Italy in the early sixteenth century.",
        "Its design grew out of earlier bowed instruments such as the fiddle.",
        "Craftsmen in Cremona, including Antonio Stradivari, perfected its shape.",
        "A violin has four strings, usually tuned in fifths.",
        "The player draws a bow of horsehair across the strings to make sound.",
        "Instruments made by the great Italian masters are still prized today.",
    ],
    "how kidneys filter blood": [
        "The kidneys are two bean-shaped organs that filter the blood.",
        "Each kidney contains about a million tiny filtering units called nephrons.",
        "The nephrons remove waste, extra salt and excess water.",
        "Useful substances, such as glucose, are taken back into the blood.",
        "The waste leaves the body as urine.",
        "The kidneys also help control blood pressure.",
    ],
    "the building of the pyramids": [
        "The great pyramids of Egypt were built as tombs for pharaohs.",
        "The largest, at Giza, was completed around 2560 BC.",
        "Workers cut huge limestone blocks and moved them on sledges.",
        "They probably used ramps to haul the blocks into place.",
        "The builders were paid labourers, not slaves as was once believed.",
        "It may have taken around twenty years to finish a single pyramid.",
    ],
    "how spiders spin webs": [
        "Spiders spin webs from silk made in glands in their abdomen.",
        "The silk leaves the body through small nozzles called spinnerets.",
        "It starts as a liquid and hardens as it is pulled.",
        "An orb weaver first builds a frame of strong threads.",
        "It then adds a sticky spiral to trap flying insects.",
        "Spider silk is stronger than steel of the same thickness.",
    ],
    "the invention of the light bulb": [
        "The electric light bulb was developed by several inventors in the nineteenth century.",
        "Thomas Edison made a practical, long-lasting version in 1879.",
        "His bulbs used a carbon filament inside a glass globe.",
        "Air was pumped out of the globe so the filament would not burn up.",
        "Later bulbs used tungsten filaments, which lasted longer.",
        "Today most homes use LED lamps, which need far less energy.",
    ],
    "how hurricanes form": [
        "Hurricanes form over warm tropical oceans.",
        "Warm, moist air rises from the sea surface and cools.",
        "As the vapour condenses, it releases heat that fuels the storm.",
        "The rotation of the Earth makes the rising air spin.",
        "A calm eye forms at the centre, surrounded by powerful winds.",
        "Hurricanes weaken quickly once they move over land.",
    ],
    "the history of the postal service": [
        "Postal systems have existed for thousands of years.",
        "The Persian Empire used relays of riders to carry royal messages.",
        "For centuries, sending letters was expensive and slow.",
        "Britain introduced the first adhesive postage stamp, the Penny Black, in 1840.",
        "Cheap, prepaid postage made letter writing popular.",
        "Today postal services deliver billions of parcels each year.",
    ],
    "how octopuses camouflage themselves": [
        "Octopuses are masters of camouflage.",
        "Their skin contains thousands of colour cells called chromatophores.",
        "By squeezing these cells, they can change colour in a fraction of a second.",
        "They can also change the texture of their skin to look like rock or coral.",
        "This helps them hide from predators and ambush prey.",
        "Scientists are still studying how they match colours so well.",
    ],
    "the science of sleep": [
        "Sleep is a natural state of rest that the body and brain need.",
        "Each night we move through repeating cycles of light, deep and dream sleep.",
        "Deep sleep helps the body repair tissues and build energy.",
        "Most vivid dreams happen during rapid eye movement sleep.",
        "Sleep also helps the brain store memories.",
        "Adults generally need seven to nine hours each night.",
    ],
    "how a refrigerator works": [
        "A refrigerator keeps food cold by moving heat from inside to outside.",
        "It uses a special fluid called a refrigerant.",
        "The refrigerant evaporates in coils inside the fridge, absorbing heat.",
        "A compressor then squeezes the gas, making it hot.",
        "Coils at the back release that heat into the kitchen.",
        "The cycle repeats continuously to hold a steady temperature.",
    ],
    "the history of the piano": [
        "The piano was invented in Italy around 1700 by Bartolomeo Cristofori.",
        "Unlike the harpsichord, it could play both soft and loud notes.",
        "That is where its original name, pianoforte, comes from.",
        "Hammers covered in felt strike the strings when keys are pressed.",
        "Composers such as Mozart and Beethoven wrote many works for it.",
        "A modern piano usually has eighty-eight keys.",
    ],
    "how coral reefs grow": [
        "Coral reefs are built by tiny animals called coral polyps.",
        "Each polyp makes a hard skeleton of calcium carbonate.",
        "Over many generations, these skeletons pile up into large reefs.",
        "The polyps share their bodies with algae that make food from sunlight.",
        "Reefs therefore grow best in clear, shallow, warm water.",
        "They provide homes for about a quarter of all marine species.",
    ],
    "the invention of the steam engine": [
        "The steam engine turned heat into mechanical work.",
        "Thomas Newcomen built an early version in 1712 to pump water from mines.",
        "James Watt later added a separate condenser, which saved a lot of fuel.",
        "Steam engines soon powered factories, ships and locomotives.",
        "They were central to the Industrial Revolution.",
        "Coal was burned to boil the water that made the steam.",
    ],
    "how elephants communicate": [
        "Elephants communicate in many ways, from loud trumpets to gentle touches.",
        "They make deep rumbles that are too low for humans to hear.",
        "These sounds can travel several kilometres.",
        "Elephants may detect distant rumbles through their feet.",
        "They also use their trunks to greet and comfort each other.",
        "Family groups stay in contact even when they are far apart.",
    ],
}

TASKS = [
    "Explain {topic}.",
    "Tell me about {topic}.",
    "Write a short explanation of {topic}.",
    "Give me a brief overview of {topic}.",
    "Describe {topic} for a curious student.",
    "Can you explain {topic}?",
    "Write a few lines about {topic}.",
]

START_WORDS = [
    "Interestingly",
    "Essentially",
    "Basically",
    "Actually",
    "Simply",
    "Notably",
    "Briefly",
    "Indeed",
    "Well",
    "Remarkably",
]
END_PHRASES = [
    "Is there anything else I can help with?",
    "Let me know if you have additional questions.",
    "Hope this helps.",
    "That is all I have to say.",
    "Thanks for reading.",
]
END_EXTRAS = ["Have a great day!", "Happy learning.", "Good luck with your studies."]
JSON_KEYS = ["answer", "response", "summary", "explanation"]
BULLET_CHARS = ["-", "*"]
SMALL_WORDS = {"a", "an", "the", "of", "and", "in", "on", "at", "to", "for", "from", "by", "with"}
STOPWORDS = set(
    """about above across after again against along already always among another around
    because become became before behind being below beneath between called cannot could
    different during either enough especially eventually every finally first further
    great instead large later little mainly might millions more most other others people
    rather really several should since slightly slowly small still their there these
    they those though thousand thousands through today together under until usually
    where which while within without would years""".split()
)

TYPES = [
    "lowercase",
    "uppercase",
    "max_words",
    "min_words",
    "include_keyword",
    "forbidden_word",
    "json_object",
    "bullet_points",
    "end_with",
    "no_commas",
    "start_with",
    "num_sentences",
    "num_paragraphs",
    "title",
]
_SHAPES = {"json_object", "bullet_points", "num_paragraphs", "num_sentences"}
INCOMPATIBLE = {
    frozenset(pair)
    for pair in [
        ("lowercase", "uppercase"),
        ("max_words", "min_words"),
        ("uppercase", "json_object"),
        ("lowercase", "end_with"),
        ("uppercase", "end_with"),
        ("include_keyword", "forbidden_word"),
        ("json_object", "end_with"),
        ("json_object", "start_with"),
        ("json_object", "title"),
        ("bullet_points", "start_with"),
        ("title", "start_with"),
        *combinations(sorted(_SHAPES), 2),
    ]
}
COMBOS = [(t,) for t in TYPES] + [
    pair for pair in combinations(TYPES, 2) if frozenset(pair) not in INCOMPATIBLE
]


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _mentions(sentence: str, word: str) -> bool:
    return check({"type": "include_keyword", "keyword": word}, sentence)


def _candidate_words(topic: str, sentences: list[str]) -> list[str]:
    """Content words that occur in exactly one sentence (never the first)."""
    banned = {w.lower() for w in re.findall(r"[A-Za-z]+", topic)}
    banned |= {w.lower() for w in re.findall(r"[A-Za-z]+", sentences[0])}
    words: list[str] = []
    for sentence in sentences[1:]:
        for word in re.findall(r"[a-z]+", sentence):
            if len(word) < 6 or word in STOPWORDS or word in banned or word in words:
                continue
            if sum(_mentions(s, word) for s in sentences) == 1:
                words.append(word)
    return words


def _title_text(topic: str) -> str:
    words = topic.split()
    out = []
    for i, word in enumerate(words):
        keep = word[0].isupper() or (i > 0 and word in SMALL_WORDS)
        out.append(word if keep else word[0].upper() + word[1:])
    return " ".join(out)


def _no_commas(sentence: str) -> str:
    return re.sub(r" {2,}", " ", re.sub(r",\s*", " ", sentence))


def _keep_one_comma(sentence: str) -> str:
    head, _, tail = sentence.partition(",")
    return head + "," + _no_commas(tail)


def _lower_first(sentence: str) -> str:
    return sentence[0].lower() + sentence[1:]


def _groups(items: list[str], n: int) -> list[list[str]]:
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def _params(kind: str, topic: str, sentences: list[str], rng: random.Random) -> dict | None:
    if kind in ("max_words",):
        return {"n": rng.choice([20, 25, 30, 35, 40, 50, 60])}
    if kind == "min_words":
        return {"n": rng.choice([15, 20, 25, 30, 40, 50])}
    if kind in ("include_keyword", "forbidden_word"):
        words = _candidate_words(topic, sentences)
        if not words:
            return None
        key = "keyword" if kind == "include_keyword" else "word"
        return {key: rng.choice(words)}
    if kind == "json_object":
        return {"key": rng.choice(JSON_KEYS)}
    if kind == "bullet_points":
        return {"n": rng.choice([2, 3, 4])}
    if kind == "end_with":
        return {"phrase": rng.choice(END_PHRASES)}
    if kind == "start_with":
        return {"word": rng.choice(START_WORDS)}
    if kind == "num_sentences":
        return {"n": rng.choice([2, 3, 4])}
    if kind == "num_paragraphs":
        return {"n": rng.choice([2, 3])}
    return {}


# --------------------------------------------------------------------------- #
# Rendering: constraints + selected sentences + style (+ slips) -> response
# --------------------------------------------------------------------------- #
def render(topic: str, cons: dict[str, dict], sents: list[str], style: dict, slip: dict) -> str:
    sents = list(sents)
    if "no_commas" in cons:
        sents = [_no_commas(s) for s in sents]
        idx = slip.get("keep_comma")
        if idx is not None:
            sents[idx] = _keep_one_comma(style["pool_raw"][idx])
    if "start_with" in cons:
        word = slip.get("starter", cons["start_with"]["word"])
        if word:
            sep = " " if "no_commas" in cons else ", "
            sents[0] = f"{word}{sep}{_lower_first(sents[0])}"

    if "bullet_points" in cons:
        if slip.get("numbered"):
            body = "\n".join(f"{i}. {s}" for i, s in enumerate(sents, 1))
        else:
            body = "\n".join(f"{style['bullet']} {s}" for s in sents)
    elif "num_paragraphs" in cons:
        n = cons["num_paragraphs"]["n"] + slip.get("para_delta", 0)
        if n < 1 or n > len(sents):
            return ""
        sep = "\n" if slip.get("single_newline") else "\n\n"
        body = sep.join(" ".join(group) for group in _groups(sents, n))
    else:
        body = " ".join(sents)

    if "end_with" in cons:
        phrase = cons["end_with"]["phrase"]
        if slip.get("end") == "extra":
            phrase = f"{phrase} {style['end_extra']}"
        elif slip.get("end") == "nopunct":
            phrase = phrase.rstrip(".?!")
        body += ("\n" if "bullet_points" in cons else " ") + phrase
    if "title" in cons:
        title = _title_text(topic)
        form = slip.get("title", "<<{}>>")
        body = form.format(title) + "\n" + body
    if "json_object" in cons:
        mode = slip.get("json")
        key = cons["json_object"]["key"]
        if mode == "wrong_key":
            key = style["wrong_key"]
        if mode != "plain":
            blob = json.dumps({key: body}, indent=2 if style["json"] == "indent" else None)
            if style["json"] == "fence":
                blob = f"```json\n{blob}\n```"
            if mode == "preface":
                blob = f"Here is the JSON you asked for:\n{blob}"
            body = blob
    if "lowercase" in cons:
        body = body.lower()
    if "uppercase" in cons:
        body = body.upper()
    return body


def _fits(prompt: str, response: str) -> bool:
    total = prompt + " " + response
    return bool(response) and (len(total.split()) <= MAX_TOTAL_WORDS and len(total) <= MAX_TOTAL_CHARS)


def _failing(constraints: list[dict], response: str) -> set[str]:
    return {c["type"] for c in constraints if not check(c, response)}


def _case_slips(text: str, original: str, upper: bool, rng: random.Random) -> list[str]:
    """Near misses for lowercase/uppercase: part of the text keeps its normal casing.

    ``text`` is the case-converted response and ``original`` the same response in
    normal case (equal length: the data is ASCII). Lowercase: a capitalised word
    (sentence start or proper noun) survives. Uppercase: one ordinary word or the
    whole final sentence stays in normal case.
    """
    assert len(text) == len(original)

    def restore(start: int, end: int) -> str:
        return text[:start] + original[start:end] + text[end:]

    spans = [m.span() for m in re.finditer(r"[A-Za-z]+", original)]
    if upper:
        spans = [(a, b) for a, b in spans if b - a >= 3 and original[a:b].islower()]
        out = [restore(a, b) for a, b in rng.sample(spans, min(2, len(spans)))]
        cut = max(original.rfind(". ", 0, len(original) - 1), original.rfind("\n"))
        if cut > 0:
            out.append(restore(cut + 1, len(original)))
        return out
    spans = [(a, b) for a, b in spans if not original[a:b].islower()]
    picks = spans[:1] + rng.sample(spans, min(2, len(spans)))
    return [restore(a, b) for a, b in picks]


def build(topic: str, sentences: list[str], constraints: list[dict], prompt: str, rng: random.Random):
    """Return (chosen, rejected) for the constraints, or None if they cannot be met."""
    cons = {c["type"]: c for c in constraints}

    # Sentences always appear in their original (logical) order.
    def ordered(chosen_sents: list[str]) -> list[str]:
        return sorted(chosen_sents, key=sentences.index)

    pool = list(sentences)
    forbidden = None
    if "forbidden_word" in cons:
        word = cons["forbidden_word"]["word"]
        forbidden = next(s for s in pool if _mentions(s, word))
        pool.remove(forbidden)
    hit = None
    if "include_keyword" in cons:
        kw = cons["include_keyword"]["keyword"]
        hit = next(s for s in pool if _mentions(s, kw))
        pool.remove(hit)

    def select(k: int) -> list[str]:
        if hit is None:
            return pool[:k]
        return ordered([*pool[: k - 1], hit])

    style = {
        "bullet": rng.choice(BULLET_CHARS),
        "json": rng.choice(["compact", "compact", "indent", "fence"]),
        "wrong_key": rng.choice(JSON_KEYS),
        "end_extra": rng.choice(END_EXTRAS),
    }
    if "json_object" in cons:
        while style["wrong_key"] == cons["json_object"]["key"]:
            style["wrong_key"] = rng.choice(JSON_KEYS)

    n_max = len(pool) + (hit is not None)

    def make(k: int, slip: dict | None = None, sel: list[str] | None = None) -> str:
        if k < 1 or k > n_max:
            return ""
        sel = select(k) if sel is None else sel
        if len(sel) != k:
            return ""
        style["pool_raw"] = sel
        return render(topic, cons, sel, style, slip or {})

    valid = [k for k in range(1, n_max + 1) if judge(constraints, make(k))]
    valid = [k for k in valid if _fits(prompt, make(k))]
    if not valid:
        return None
    preferred = [k for k in valid if k >= 2] or valid
    k = rng.choice(preferred)
    chosen = make(k)

    # ---- near misses, one constraint at a time ------------------------------
    order = list(cons)
    rng.shuffle(order)
    for kind in order:
        cands: list[str] = []
        if kind in ("lowercase", "uppercase"):
            plain = {t: c for t, c in cons.items() if t not in ("lowercase", "uppercase")}
            original = render(topic, plain, select(k), style, {})
            cands = _case_slips(chosen, original, upper=kind == "uppercase", rng=rng)
        elif kind in ("max_words", "num_sentences", "bullet_points", "min_words"):
            deltas = [-1, -2, -3] if kind == "min_words" else [1, -1, 2]
            if kind == "max_words":
                deltas = [1, 2, 3]
            cands = [make(k + d) for d in deltas]
            if kind == "bullet_points":
                cands.append(make(k, {"numbered": True}))
        elif kind == "include_keyword":
            cands = [make(k, sel=pool[:k])]
        elif kind == "forbidden_word":
            cands = [make(k, sel=ordered([*pool[: k - 1], forbidden]))]
        elif kind == "json_object":
            cands = [make(k, {"json": m}) for m in ("plain", "wrong_key", "preface")]
        elif kind == "end_with":
            cands = [make(k, {"end": m}) for m in ("extra", "nopunct")]
        elif kind == "no_commas":
            raw = select(k)
            cands = [make(k, {"keep_comma": i}) for i, s in enumerate(raw) if "," in s]
        elif kind == "start_with":
            other = rng.choice([w for w in START_WORDS if w != cons[kind]["word"]])
            cands = [make(k, {"starter": ""}), make(k, {"starter": other})]
        elif kind == "num_paragraphs":
            slips = [{"para_delta": 1}, {"para_delta": -1}, {"single_newline": True}]
            cands = [make(k, s) for s in slips]
        elif kind == "title":
            forms = ["{}", "**{}**", "# {}"]
            cands = [make(k, {"title": f}) for f in forms]
        cands = [c for c in cands if c and c != chosen and _fits(prompt, c)]
        rng.shuffle(cands)
        exact = [c for c in cands if _failing(constraints, c) == {kind}]
        loose = [c for c in cands if kind in _failing(constraints, c)]
        if exact or loose:
            return chosen, (exact or loose)[0]
    return None


# --------------------------------------------------------------------------- #
# Dataset assembly
# --------------------------------------------------------------------------- #
def sample(topic: str, sentences: list[str], rng: random.Random):
    """One (prompt, constraints, chosen, rejected, topic) example, or None."""
    combo = rng.choice(COMBOS) if rng.random() < 0.65 else (rng.choice(TYPES),)
    constraints = []
    for kind in combo:
        params = _params(kind, topic, sentences, rng)
        if params is None:
            return None
        constraints.append({"type": kind, **params})
    rng.shuffle(constraints)
    task = rng.choice(TASKS).format(topic=topic)
    prompt = " ".join([task, *(describe(c) for c in constraints)])
    built = build(topic, sentences, constraints, prompt, rng)
    if built is None:
        return None
    chosen, rejected = built
    assert judge(constraints, chosen), (constraints, chosen)
    assert not judge(constraints, rejected), (constraints, rejected)
    assert _fits(prompt, chosen) and _fits(prompt, rejected), (prompt, chosen, rejected)
    return prompt, constraints, chosen, rejected, topic


def collect(topics: dict[str, list[str]], n: int, seed: int) -> list[tuple]:
    """``n`` examples with distinct prompts, topics used round-robin (balanced)."""
    rng = random.Random(seed)
    names = sorted(topics)
    rng.shuffle(names)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        topic = names[len(out) % len(names)]
        for _ in range(1000):
            example = sample(topic, topics[topic], rng)
            if example is not None and example[0] not in seen:
                break
        else:
            raise RuntimeError(f"cannot generate a new example for topic {topic!r}")
        seen.add(example[0])
        out.append(example)
    rng.shuffle(out)
    return out


def _user(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def build_files() -> dict[str, list[dict]]:
    files: dict[str, list[dict]] = {}
    sft = collect(TRAIN_TOPICS, COUNTS["sft_train"], SEED + 1)
    files["sft_train"] = [
        {
            "messages": _user(p) + _assistant(good),
            "constraints": cons,
            "topic": topic,
        }
        for p, cons, good, _bad, topic in sft
    ]
    for split, topics, seed in (("train", TRAIN_TOPICS, SEED + 2), ("test", TEST_TOPICS, SEED + 3)):
        pairs = collect(topics, COUNTS[f"pairs_{split}"], seed)
        files[f"pairs_{split}"] = [
            {
                "prompt": _user(p),
                "chosen": _assistant(good),
                "rejected": _assistant(bad),
                "constraints": cons,
                "topic": topic,
            }
            for p, cons, good, bad, topic in pairs
        ]
    for split, topics, seed in (("train", TRAIN_TOPICS, SEED + 4), ("test", TEST_TOPICS, SEED + 5)):
        prompts = collect(topics, COUNTS[f"prompts_{split}"], seed)
        files[f"prompts_{split}"] = [
            {"id": f"{split}-{i:05d}", "prompt": _user(p), "constraints": cons, "topic": topic}
            for i, (p, cons, _good, _bad, topic) in enumerate(prompts)
        ]
    rng = random.Random(SEED + 6)
    for name, source in (("tiny_pairs", "pairs_train"), ("tiny_sft", "sft_train")):
        idx = sorted(rng.sample(range(len(files[source])), TINY))
        files[name] = [files[source][i] for i in idx]
    return files


def write(out_dir: Path) -> dict[str, int]:
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, rows in build_files().items():
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts[name] = len(rows)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output directory")
    args = parser.parse_args(argv)
    assert not set(TRAIN_TOPICS) & set(TEST_TOPICS)
    for name, count in write(args.out).items():
        print(f"{name}.jsonl: {count} rows")


if __name__ == "__main__":
    main()
