"""
The synthetic world: children's stories composed by a small grammar, in English and
Chinese; the instruction and preference sets built from the same grammar; and the rules that
say whether an answer does what its request asked (follows), which are both the held-out
check of instruction following and RL's verifiable reward.

Every story has a hero (a name and an animal), a home, a wanted thing, a problem that
keeps the hero from it, a little dialogue, a helper and a resolution that fits the
problem, and an ending. Names must be carried through the story and the resolution must
match the problem, so a model has to learn structure; it cannot memorise 20,000 stories.
Everything is deterministic for a given seed. Used by `preprocess.py synth`, `sft`, `dpo`,
sample.py's instruction-following eval and train_rl.py's reward.
"""

import random
import re
import zlib

# -----------------------------------------------------------------------------
# English vocabulary of the grammar

NAMES = [("Lily", "f"), ("Tom", "m"), ("Mia", "f"), ("Ben", "m"), ("Sue", "f"), ("Max", "m"),
         ("Anna", "f"), ("Sam", "m"), ("Lucy", "f"), ("Jack", "m"), ("Emma", "f"), ("Leo", "m"),
         ("Zoe", "f"), ("Tim", "m"), ("Ella", "f"), ("Finn", "m"), ("Rosa", "f"), ("Joe", "m"),
         ("Kim", "f"), ("Dan", "m"), ("Amy", "f"), ("Bob", "m"), ("Nora", "f"), ("Ned", "m"),
         ("Ivy", "f"), ("Otto", "m"), ("Ruby", "f"), ("Hugo", "m"), ("Luna", "f"), ("Pip", "m")]
ANIMALS = ["bunny", "cat", "dog", "bear", "fox", "frog", "duck", "mouse", "lion", "owl",
           "turtle", "pig", "horse", "bird", "squirrel", "monkey", "puppy", "kitten",
           "elephant", "tiger", "cow", "goat", "hedgehog", "penguin"]
PLACES = ["a small house near the woods", "a big red barn on a farm", "a quiet town by the sea",
          "a cozy hole under an old tree", "a little village on a hill", "a green park in the city",
          "a warm nest in a garden", "a sunny field full of flowers", "a tiny house by the river",
          "a busy street with many shops"]
COLORS = ["red", "blue", "green", "yellow", "pink", "big", "shiny", "little", "new", "soft"]
THINGS = ["ball", "kite", "hat", "boat", "drum", "book", "cake", "apple", "balloon", "car",
          "bike", "shell", "flower", "cookie", "robot", "doll", "train", "box", "bell", "scarf"]
ACTIVITIES = ["play in the sun", "run in the grass", "sing songs", "jump in puddles",
              "read books", "build castles in the sand", "dance with friends", "climb trees",
              "draw pictures", "look at the stars", "splash in the water", "pick berries"]
SAD = ["sad", "worried", "upset", "scared", "angry", "lonely"]
GLAD = ["happy", "proud", "glad", "excited", "thankful", "calm"]
# (problem, resolution): the resolution must answer this problem, with a helper who fits it
PROBLEMS = [
    ("But the {thing} got stuck high up in a tall tree.",
     "{Friend} the {friend_animal} climbed up the tree and brought the {thing} down."),
    ("But the {thing} fell into the pond with a big splash.",
     "{Friend} the {friend_animal} jumped into the pond and pushed the {thing} back to the shore."),
    ("But the {thing} broke into two pieces.",
     "{Friend} the {friend_animal} helped {him} fix the {thing} with some glue."),
    ("But {Friend} the {friend_animal} had the {thing} and did not want to share.",
     "{Name} asked nicely, and {Friend} smiled and said they could play with the {thing} together."),
    ("But {name} could not find the {thing} anywhere.",
     "{Friend} the {friend_animal} helped {him} look, and they found the {thing} under a bush."),
    ("But a strong wind came and blew the {thing} far away.",
     "{Friend} the {friend_animal} ran fast and caught the {thing} before it was gone."),
    ("But the {thing} was on a high shelf, too high to reach.",
     "{Friend} the {friend_animal} held the ladder, and {name} climbed up and got the {thing}."),
]
SAY_SAD = ['"Oh no, my {thing}!" said {name}.', '"What can I do now?" {name} cried.',
           '"I want my {thing} back," said {name}.', '"This is not fair," said {name}.']
SAY_HELP = ['"Do not worry, I will help you," said {Friend}.', '"I can help!" said {Friend}.',
            '"Let me try," said {Friend} with a smile.', '"We can do it together," said {Friend}.']
ENDINGS = ["From that day on, {name} and {Friend} were best friends.",
           "{Name} learned that it is good to ask friends for help.",
           "{Name} played with the {thing} all day long.",
           "{Name} said thank you and gave {Friend} a big hug.",
           "That night, {name} went to sleep with the {thing} close by."]


def _pronouns(g):
    return ("she", "her", "her") if g == "f" else ("he", "him", "his")


def _cap(s):
    return s[0].upper() + s[1:]


def story_en(rng, animal=None, thing=None, name=None):
    """Returns (text, facts): facts holds the slots a question or a check can refer to."""
    name, g = next(n for n in NAMES if n[0] == name) if name else rng.choice(NAMES)
    friend, _ = rng.choice([n for n in NAMES if n[0] != name])
    animal = animal or rng.choice(ANIMALS)
    friend_animal = rng.choice([a for a in ANIMALS if a != animal])
    thing = thing or rng.choice(THINGS)
    color, place, act = rng.choice(COLORS), rng.choice(PLACES), rng.choice(ACTIVITIES)
    sad, glad = rng.choice(SAD), rng.choice(GLAD)
    problem, fix = rng.choice(PROBLEMS)
    he, him, his = _pronouns(g)
    slots = dict(name=name, Name=name, Friend=friend, friend_animal=friend_animal, thing=thing,
                 him=him, he=he, his=his)
    fill = lambda s: _cap(s.format(**slots))
    opening = rng.choice([
        f"Once upon a time, there was a little {animal} named {name}.",
        f"Once upon a time, in {place}, there lived a little {animal} called {name}.",
        f"There was once a {rng.choice(['kind', 'curious', 'brave', 'shy', 'funny'])} "
        f"{animal} named {name}.",
        f"One sunny morning, a little {animal} named {name} woke up early.",
    ])
    home = "" if place in opening else f"{_cap(he)} lived in {place}."
    like = f"{_cap(he)} loved to {act}."
    want = rng.choice([f"One day, {name} saw a {color} {thing} and wanted it very much.",
                       f"One day, {name} wanted a {color} {thing}.",
                       f"{name} wished for a {color} {thing} more than anything."])
    middle = [fill(problem), f"{name} felt {sad}.", fill(rng.choice(SAY_SAD))]
    rng.shuffle(middle[1:])  # feeling and words in either order
    come = "" if "{Friend}" in problem else fill(rng.choice([
        "Just then, {his} friend {Friend} the {friend_animal} came by.",
        "Then {Friend} the {friend_animal} saw {him}.", "{Friend} the {friend_animal} heard {him}."]))
    help_ = [come, fill(rng.choice(SAY_HELP)), fill(fix), f"Now {name} was {glad}."]
    parts = [opening, home, like] if rng.random() < 0.5 else [opening, like, home]
    text = " ".join(p for p in parts + [want] + middle + help_ + [fill(rng.choice(ENDINGS))] if p)
    facts = dict(lang="en", name=name, animal=animal, thing=thing, place=place,
                 friend=friend, feeling=glad)
    return text, facts


# -----------------------------------------------------------------------------
# Chinese: the same skeleton with its own words

ZH_NAMES = ["小明", "小红", "丽丽", "乐乐", "豆豆", "天天", "甜甜", "冬冬", "欢欢", "圆圆",
            "小雨", "小月", "阿宝", "花花", "亮亮", "朵朵"]
ZH_ANIMALS = ["小兔子", "小猫", "小狗", "小熊", "小狐狸", "小青蛙", "小鸭子", "小老鼠", "小狮子",
              "小猴子", "小猪", "小鸟", "小松鼠", "小乌龟", "小马", "小象"]
ZH_PLACES = ["森林边的小房子里", "大农场的红房子里", "海边的小镇上", "老树下的小洞里",
             "山坡上的小村子里", "城市的公园里", "河边的小屋里", "开满鲜花的田野里"]
ZH_THINGS = ["皮球", "风筝", "帽子", "小船", "图画书", "蛋糕", "苹果", "气球", "小汽车", "贝壳",
             "鲜花", "饼干", "机器人", "小铃铛"]
ZH_MEASURE = dict(风筝="只", 帽子="顶", 小船="条", 图画书="本", 蛋糕="块", 小汽车="辆", 鲜花="朵", 饼干="块")
ZH_COLORS = ["红色的", "蓝色的", "绿色的", "黄色的", "漂亮的", "新的", "大大的", "闪亮的"]
ZH_ACTS = ["在阳光下玩耍", "在草地上奔跑", "唱歌", "在水坑里跳", "看书", "画画", "爬树", "看星星"]
ZH_SAD = ["难过", "着急", "伤心", "害怕", "生气"]
ZH_GLAD = ["开心", "高兴", "快乐", "骄傲", "满足"]
ZH_PROBLEMS = [
    ("可是，{thing}挂在了高高的树上。", "{friend}爬上大树，把{thing}拿了下来。"),
    ("可是，{thing}掉进了池塘里。", "{friend}跳进池塘，把{thing}推回了岸边。"),
    ("可是，{thing}摔成了两半。", "{friend}拿来胶水，帮{name}把{thing}修好了。"),
    ("可是，{name}到处都找不到{thing}。", "{friend}帮{name}一起找，他们在草丛里找到了{thing}。"),
    ("可是，一阵大风把{thing}吹走了。", "{friend}跑得飞快，把{thing}追了回来。"),
]
ZH_ENDINGS = ["从那天起，{name}和{friend}成了最好的朋友。", "{name}明白了，遇到困难可以请朋友帮忙。",
              "{name}抱着{thing}玩了一整天。", "{name}对{friend}说：“谢谢你！”"]


def story_zh(rng, animal=None, thing=None):
    name, friend = rng.sample(ZH_NAMES, 2)
    animal = animal or rng.choice(ZH_ANIMALS)
    friend_animal = rng.choice([a for a in ZH_ANIMALS if a != animal])
    thing = thing or rng.choice(ZH_THINGS)
    problem, fix = rng.choice(ZH_PROBLEMS)
    slots = dict(name=name, friend=friend_animal + friend, thing=thing)
    one = "一" + ZH_MEASURE.get(thing, "个")
    sad, glad = rng.choice(ZH_SAD), rng.choice(ZH_GLAD)
    text = "".join([
        rng.choice([f"从前，有一只{animal}，名叫{name}。", f"很久以前，{rng.choice(ZH_PLACES)}住着一只{animal}，它叫{name}。"]),
        f"{name}最喜欢{rng.choice(ZH_ACTS)}。",
        rng.choice([f"有一天，{name}看到了{one}{rng.choice(ZH_COLORS)}{thing}，非常想要。",
                    f"有一天，{name}想要{one}{rng.choice(ZH_COLORS)}{thing}。"]),
        problem.format(**slots), f"{name}很{sad}。", f"“我的{thing}！”{name}说。",
        f"“别担心，我来帮你！”{slots['friend']}说。", fix.format(**slots),
        f"{name}又{glad}起来了。", rng.choice(ZH_ENDINGS).format(**slots)])
    return text, dict(lang="zh", name=name, animal=animal, thing=thing, friend=friend, feeling=glad)


def stories(n, seed=0, zh_fraction=0.1):
    """n distinct stories (text only), deterministic for a seed."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        text, _ = story_zh(rng) if rng.random() < zh_fraction else story_en(rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


# -----------------------------------------------------------------------------
# instructions (SFT) and preferences (DPO), with the check that says if an answer follows

def _other(rng, choices, not_this):
    return rng.choice([c for c in choices if c != not_this])


def instruction(rng, rejected=False):
    """One (messages, check) pair: a user request and an assistant answer, and the check
    an answer must pass to follow it (see follows): for a story, {"hero": [the asked-for
    animal], "want": [the wished-for thing]}; for a question, {"must": [the asked-for fact],
    "not": [the other names, and animals or things]}; "kind", the class of the request
    (story_en, story_zh, q_name, q_thing, q_friend, q_animal), for reporting by class.
    With rejected=True the answer is just as fluent but answers a different request
    (another animal, thing or name): the "rejected" side of a preference pair."""
    kind = rng.random()
    if kind < 0.55:  # a story with a requested hero and wish: 45% English, 10% Chinese
        en = kind < 0.45
        animals, things, story = (ANIMALS, THINGS, story_en) if en else (ZH_ANIMALS, ZH_THINGS, story_zh)
        animal, thing = rng.choice(animals), rng.choice(things)
        ask = rng.choice([f"Tell me a story about a {animal} who wants a {thing}.",
                          f"Write a short story about a {animal} and a {thing}.",
                          f"Can you tell me a story about a little {animal} who wished for a {thing}?"]
                         if en else [f"给我讲一个关于{animal}想要{thing}的故事。", f"请写一个{animal}和{thing}的故事。"])
        check = {"kind": "story_en" if en else "story_zh", "hero": [animal], "want": [thing]}
        # the story has its own random stream, so a rejected answer is the same story with
        # another hero and wish: a preference pair then differs only where it matters
        story_rng = random.Random(rng.getrandbits(32))
        asked = animal
        if rejected:
            animal, thing = _other(rng, animals, animal), _other(rng, things, thing)
        answer, _ = story(story_rng, animal=animal, thing=thing)
        while rejected and has_word(answer, asked):  # not even as the helper
            answer, _ = story(story_rng, animal=animal, thing=thing)
    else:  # a question about a given story
        story, f = story_en(rng)
        q, answer, key = rng.choice([
            ("Who is the story about?", "The story is about {name}, a little {animal}.", "name"),
            ("What did {name} want?", "{name} wanted a {thing}.", "thing"),
            ("Who helped {name}?", "{friend} helped {name}.", "friend"),
            ("What kind of animal is {name}?", "{name} is a {animal}.", "animal"),
        ])
        ask = f"Read this story and answer the question.\n\n{story}\n\nQuestion: {q.format(**f)}"
        # naming every character is no answer to "Who helped Tom?": RL found that loophole
        others = [n for n, _ in NAMES] + {"animal": ANIMALS, "thing": THINGS}.get(key, [])
        check = {"kind": f"q_{key}", "must": [f[key]],
                 "not": [w for w in others if w not in (f[key], f["name"])]}
        if rejected:  # the same answer with the asked-for fact wrong
            pool = {"name": [n for n, _ in NAMES if n != f["friend"]], "friend": [n for n, _ in NAMES if n != f["name"]],
                    "animal": ANIMALS, "thing": THINGS}[key]
            f = dict(f, **{key: _other(rng, pool, f[key])})
        answer = answer.format(**f)
    return [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}], check


KINDS = ("story_en", "story_zh", "q_name", "q_thing", "q_friend", "q_animal")


def has_word(answer, w):
    """w as a whole word: "ball" is not "balloon" (Chinese has no word bounds to test)"""
    return re.search(r"(?<![A-Za-z])" + re.escape(w) + r"(?![A-Za-z])", answer) is not None


def complete(answer):
    """It ends a sentence rather than stopping midway."""
    return answer.rstrip().endswith(('.', '!', '?', '"', '。', '！', '？', '”'))


def opening(answer):
    """The first sentence, where a story introduces its hero"""
    return re.split(r"(?<=[.!?。！？])", answer, maxsplit=1)[0]


def follows(answer, check):
    """The one rule of instruction following, for the held-out eval and RL's reward alike.
    A story must introduce the asked-for animal as its hero, in its opening sentence: an
    animal named anywhere would let a cat story with "Luna the dog" as the helper pass for a
    dog story (RL finds such loopholes: it optimises the rule, not the intent). A question's
    answer must name the asked-for fact and nothing its check forbids. Either must be a
    complete sentence."""
    if not complete(answer):
        return False
    if "hero" in check:
        return all(has_word(opening(answer), w) for w in check["hero"])
    return (all(has_word(answer, w) for w in check["must"])
            and not any(has_word(answer, w) for w in check.get("not", [])))


def wish(answer, check):
    """A story also names the thing its hero wished for (the eval does not ask for it)"""
    return all(has_word(answer, w) for w in check.get("want", []))


def reward(answer, check, stopped, wish_weight=0.2):
    """RL's verifiable reward: 1 if the answer follows its request (what the held-out check
    counts), plus wish_weight if it is a story that also names the wish; 0 for an answer that
    does not follow, or never stopped (no <|im_end|> before the length limit), whatever else
    it says, so neither the wish alone nor rambling pays."""
    if not (stopped and follows(answer, check)):
        return 0.0
    return 1.0 + wish_weight * ("want" in check and wish(answer, check))


def passes(answer, check):
    """pass@1's test: it follows, and a story names the wish too"""
    return follows(answer, check) and wish(answer, check)


def held_out(request):
    """A fixed tenth of the requests (by their text) is never trained on."""
    return zlib.crc32(request.encode()) % 10 == 0


def instructions(n, seed=0, heldout=False):
    """n (messages, check) pairs from the training or the held-out part of the space."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        messages, check = instruction(rng)
        if held_out(messages[0]["content"]) == heldout:
            out.append((messages, check))
    return out


def cut_off(rng, answer):
    """The answer stopped partway, not at the end of a sentence."""
    parts = answer.split(' ') if ' ' in answer else list(answer)
    k = rng.randint(max(1, len(parts) // 3), max(1, 2 * len(parts) // 3))
    return (' ' if ' ' in answer else '').join(parts[:k]).rstrip('.!?"。！？”，, ')


def preference(rng):
    """A prompt, an answer that follows it (chosen) and one that does not (rejected): a
    third of the time the same answer cut off midway, otherwise the same story about
    another animal, or the same answer with the asked-for fact wrong."""
    cut = rng.random() < 1 / 3
    state = rng.getstate()
    messages, check = instruction(rng)
    if cut:
        rejected = cut_off(rng, messages[1]["content"])
    else:
        rng.setstate(state)
        other, _ = instruction(rng, rejected=True)
        assert other[0] == messages[0]
        rejected = other[1]["content"]
    assert follows(messages[1]["content"], check) and not follows(rejected, check)
    return {"prompt": messages[:1], "chosen": messages[1]["content"], "rejected": rejected,
            "check": check}


def preferences(n, seed=0, heldout=False):
    rng, out = random.Random(seed), []
    while len(out) < n:
        p = preference(rng)
        if held_out(p["prompt"][0]["content"]) == heldout:
            out.append(p)
    return out
