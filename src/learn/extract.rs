//! Rule-based preference extraction: high-precision patterns for common
//! first-person statements.
//!
//! Only the user's own first-person statements count. A sentence is passed
//! over when it is a question, a hypothetical ("if I were vegan…", "I wish
//! I lived…"), quoted text, or about another person ("my brother loves
//! golf"). Negated likes become dislikes, never likes. Every candidate
//! carries its evidence: the exact sentence of the message it came from.
//!
//! The LLM extractor (grammar-constrained JSON) is the second extractor the
//! capture issue asks for; it is not written yet.

use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;

use crate::profile::Polarity;

/// A preference found in a message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub attribute: String,
    pub target: String,
    pub polarity: Polarity,
    pub confidence: f64,
    /// The exact span of the message it was read from.
    pub evidence: String,
    /// Which rule produced it (for debugging and the eval report).
    pub rule: &'static str,
}

fn re(p: &str) -> Regex {
    Regex::new(p).unwrap_or_else(|e| panic!("bad extraction pattern {p}: {e}"))
}

/// (rule name, pattern, attribute, polarity, confidence). `attribute`
/// "$1" means the first group names the attribute and the second is the
/// target; otherwise the first group is the target.
struct Rule {
    name: &'static str,
    pattern: Regex,
    attribute: &'static str,
    polarity: Polarity,
    confidence: f64,
}

static RULES: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    use Polarity::*;
    let r = |name, p: &str, attribute, polarity, confidence| Rule {
        name,
        pattern: re(&format!("(?i)^{p}$")),
        attribute,
        polarity,
        confidence,
    };
    vec![
        r(
            "favorite",
            r"my (?:very )?(?:all[- ]time )?(?:favou?rite|fav|preferred) (.+?) (?:is|are|has to be|would be|was always) (.+)",
            "$1",
            Like,
            0.95,
        ),
        r(
            "favorite-inverted",
            r"(.+?) (?:is|are) (?:definitely |probably )?my (?:all[- ]time )?(?:favou?rite|fav|preferred) (.+)",
            "$2<-$1",
            Like,
            0.9,
        ),
        r(
            "allergy",
            r"i(?:'m| am) (?:severely |very |deathly |highly )?allergic to (.+)",
            "allergy",
            Is,
            0.95,
        ),
        r(
            "intolerance",
            r"i(?:'m| am) (.+?) intolerant",
            "food intolerance",
            Is,
            0.9,
        ),
        r(
            "diet",
            r"i(?:'m| am) (?:a |an )?(?:strict )?(vegan|vegetarian|pescatarian|keto|paleo|gluten[- ]free|lactose[- ]free|halal|kosher|teetotal(?:er)?|celiac|coeliac)\b.*",
            "diet",
            Is,
            0.9,
        ),
        r(
            "location-live",
            r"i (?:currently |now |still |also )?(?:live|reside|am living|'m living|am based|'m based) (?:in|at|near|on|under|by|with) (.+)",
            "location",
            Is,
            0.9,
        ),
        r(
            "location-move",
            r"i(?:'ve| have)? (?:just |recently )?(?:moved|relocated) to (.+)",
            "location",
            Is,
            0.9,
        ),
        r(
            "moved-from",
            r"i(?:'ve| have)? (?:just |recently )?(?:moved|came|emigrated|immigrated) (?:here |over )?from (.+)",
            "hometown",
            Is,
            0.85,
        ),
        r(
            "school-went",
            r"i went to (?:college|school|university|high school|grad school|law school|med school) (?:at|in) (.+)",
            "education",
            Is,
            0.85,
        ),
        r(
            "location-from",
            r"i(?:'m| am) (?:originally )?from (.+)",
            "hometown",
            Is,
            0.85,
        ),
        r(
            "location-grew",
            r"i grew up (?:in|on|near) (.+)",
            "hometown",
            Is,
            0.85,
        ),
        r(
            "job-work-as",
            r"i (?:currently |also |still |now |have been |'ve been )?work(?:ing)? as (?:a |an )?(.+?)(?: for (?:the past |over )?\w+ (?:years?|months?))?",
            "profession",
            Is,
            0.9,
        ),
        r(
            "remote",
            r"i (?:mostly |mainly |currently |now |usually )?work (?:from|at) home\b.*",
            "work arrangement",
            Is,
            0.8,
        ),
        r(
            "jobs-count",
            r"i have ((?:two|three|four|\d+) (?:part[- ]time |full[- ]time |different )?jobs\b.*)",
            "job",
            Is,
            0.8,
        ),
        r(
            "job-work-in",
            r"i (?:currently |used to )?work(?:ed)? (?:full[- ]?time |part[- ]?time )?(?:in|at|for) (.+)",
            "job",
            Is,
            0.85,
        ),
        r(
            "job-got",
            r"i (?:just )?(?:got|started|have|landed) a (?:new )?job (?:working |as an? |at |in )(?:in |at |as an? )?(.+)",
            "job",
            Is,
            0.85,
        ),
        // A business of one's own, named by its kind: "I also have a dog
        // walking business", "I ran a blog about rabbit rescues".
        r(
            "business",
            r"i (?:also |just |recently )?(?:have|run|ran|own|owned|started|opened|manage|managed) (?:a |an |my own |our own )((?:[\w'-]+ ){0,4}(?:business|blog|shop|company|store|channel|podcast|bakery|restaurant|cafe|farm|firm|startup|salon|studio)\b.*)",
            "business",
            Is,
            0.8,
        ),
        r(
            "job-run",
            r"i (?:own|run|manage) (?:a |an |my own )(.+)",
            "profession",
            Is,
            0.8,
        ),
        r(
            "age",
            r"i(?:'m| am) (\d{1,3})(?: ?years? old|yo)?\b.*",
            "age",
            Is,
            0.9,
        ),
        r(
            "age-words",
            r"i(?:'m| am) ((?:(?:twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)(?:[- ](?:one|two|three|four|five|six|seven|eight|nine))?|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen)) years? old\b.*",
            "age",
            Is,
            0.9,
        ),
        r(
            "age-turned",
            r"i (?:just |recently )?turned (\d{1,3}|(?:(?:twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)(?:[- ](?:one|two|three|four|five|six|seven|eight|nine))?|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen))(?: ?years? old)?\b.*",
            "age",
            Is,
            0.85,
        ),
        r(
            "relationship",
            r"i(?:'m| am) (?:happily |recently |happy being |content being )?((?:married|single|divorced|engaged|widowed|unmarried|getting married|in an? (?:\w+ ){0,3}relationship)\b.*)",
            "relationship status",
            Is,
            0.9,
        ),
        r("name", r"my name is (.+)", "name", Is, 0.95),
        r(
            "study",
            r"i(?:'m| am)? (?:currently |also |still )?(?:study|studying|studied|majoring in|doing a (?:degree|phd|masters?) in) (.+)",
            "education",
            Is,
            0.85,
        ),
        r(
            "pet",
            r"i (?:have|own|got|adopted) (?:a |an |two |three |four |\d+ ?)?(?:pet |little |big |old |young |rescue |new )?((?:\w+ ){0,2}(?:dog|cat|puppy|puppies|kitten|turtle|parrot|hamster|rabbit|bunny|bunnies|fish|goldfish|snake|lizard|horse|pony|ponies|ferret|guinea pig|bird|iguana|gecko|tortoise|chicken|goat|pig|cow|sheep|mouse|mice|rat|frog|spider)s?\b.*)",
            "pet",
            Is,
            0.85,
        ),
        r(
            "vehicle",
            r"i (?:drive|ride|own|have) (?:a |an )?(.*?\b(?:car|truck|pickup|van|suv|motorcycle|bike|scooter|tesla|ford|toyota|honda|bmw|audi|jeep|volvo|vw|volkswagen|prius|civic|mustang|harley|motorbike|nissan|chevy|chevrolet|subaru|mazda|kia|hyundai|dodge|gmc|lexus|mercedes|porsche|ferrari|pathfinder|camry|corolla|beetle)s?\b.*)",
            "vehicle",
            Is,
            0.85,
        ),
        r(
            "fear",
            r"i(?:'m| am) (?:deathly |very |really |so |terribly |absolutely )?(?:terrified|afraid|scared|frightened) of (.+)",
            "fear",
            Is,
            0.85,
        ),
        r(
            "dislike",
            r"i (?:(?:really|absolutely|totally|just|truly|also|honestly|strongly|definitely|generally|much|always|usually|actually|particularly|especially|greatly|deeply|simply|still) )*(?:hate|dislike|detest|loathe|can't stand|cannot stand|can not stand|don't like|do not like|don't enjoy|do not enjoy|don't eat|do not eat|don't drink|do not drink|don't care (?:about|for)|do not care (?:about|for)|couldn't care less about|could not care less about|avoid|never eat|never drink|steer clear of|stay away from)(?: to)? (.+)",
            "dislikes",
            Dislike,
            0.85,
        ),
        r(
            "dislike-fan",
            r"i(?:'m| am) (?:really )?not (?:a (?:big )?fan of|into|keen on) (.+)",
            "dislikes",
            Dislike,
            0.85,
        ),
        r(
            "like",
            r"i (?:(?:really|absolutely|totally|just|truly|also|honestly|strongly|definitely|generally|much|always|usually|actually|particularly|especially|greatly|deeply|simply|still|do) )*(?:love|like|enjoy|adore|prefer|am into|'m into|am passionate about|'m passionate about|am obsessed with|'m obsessed with|am a (?:big |huge )?fan of|'m a (?:big |huge )?fan of|am crazy about|'m crazy about)(?: to)? (.+)",
            "likes",
            Like,
            0.8,
        ),
        r(
            "hobby-verb",
            r"i (?:often |usually |always |regularly |also |love to |like to |enjoy )?(play(?:ed)?|collect|knit|paint|bake|hike|surf|ski|swim|dance|sing|garden|fish|hunt|climb|camp|cycle|skate|sew|draw|write|read|cook) (.+)",
            "hobby",
            Is,
            0.6,
        ),
        r(
            "hobby-go",
            r"i (?:often |usually |always |regularly )?go ((?:\w+ing)\b.*)",
            "hobby",
            Is,
            0.7,
        ),
        r(
            "my-hobby",
            r"my (?:main |biggest |only |new |current )?(?:hobby|hobbies|pastime|pastimes|passion|passions) (?:is|are|includes?|would be|has always been) (.+)",
            "hobby",
            Is,
            0.9,
        ),
        r(
            "pet-named",
            r"i (?:have|own|got|adopted) (?:a |an |two |three |\d+ )?((?:\w+ ){0,2}\w+) (?:named|called) (.+)",
            "pet",
            Is,
            0.75,
        ),
        r(
            "interest",
            r"i(?:'m| am) (?:very |really |deeply |also |especially |particularly )?interested in (.+?)(?: and .*)?",
            "interest",
            Is,
            0.8,
        ),
        r(
            "care-about",
            r"i (?:really |truly )?care (?:deeply |a lot |so much |passionately )?about (.+)",
            "interest",
            Is,
            0.75,
        ),
        r(
            "is-my-passion",
            r"(.+?) (?:is|are) (?:really |definitely )?my (?:biggest |main |true |greatest |one )?(?:passion|hobby|obsession|favou?rite (?:thing to do|pastime|activity))",
            "hobby",
            Is,
            0.85,
        ),
        r(
            "know-how",
            r"i (?:also )?know how to (.+)",
            "skill",
            Is,
            0.7,
        ),
        r(
            "team",
            r"i (?:am|was|'m|play|played) on (?:the|a|my) (?:(?:school|college|high school|university|varsity|local|company|office|national) )?(\w+(?: \w+)?) team\b.*",
            "sport",
            Is,
            0.8,
        ),
        r(
            "as-a-hobby",
            r"i (?:also )?(.+?) (?:as a hobby|for fun|as a pastime|in my spare time|in my free time)",
            "hobby",
            Is,
            0.75,
        ),
        r(
            "sweet-tooth",
            r"i have (?:a |an )?(?:big |huge |real |massive |terrible )?sweet tooth\b.*",
            "food preference",
            Like,
            0.85,
        ),
        r(
            "childfree",
            r"i (?:do not|don't|never) want (?:any )?(?:kids|children|to have (?:kids|children))\b.*",
            "family",
            Is,
            0.8,
        ),
        r(
            "garden",
            r"i have (?:a |an )?(?:large |big |small |little |huge |vegetable |flower |herb |beautiful )*(?:garden|allotment)\b.*",
            "hobby",
            Is,
            0.75,
        ),
        r(
            "my-transport",
            r"my (?:main |only |usual )?(?:means of )?(?:transportation|transport|ride|vehicle) is (?:my |a |an )?(.+)",
            "vehicle",
            Is,
            0.8,
        ),
        r(
            "dream-thing",
            r"my dream (?:car|house|home|job|vacation|holiday|destination|trip|pet|wedding) (?:is|would be) (?:a |an |to )?(.+)",
            "aspiration",
            Is,
            0.8,
        ),
        r(
            "role-model",
            r"my (?:personal )?(?:ideal|hero|role model|idol|inspiration) (?:is|has always been) (.+)",
            "role model",
            Is,
            0.8,
        ),
        r(
            "on-diet",
            r"i(?:'m| am) (?:currently |now |still )?on a (?:strict )?(?:(\w+) )?diet\b.*",
            "diet",
            Is,
            0.8,
        ),
        r(
            "had-surgery",
            r"i (?:just |recently )?had (?:an? )?((?:\w+ )?(?:surgery|operation|transplant|heart attack|stroke))\b.*",
            "health condition",
            Is,
            0.8,
        ),
        r(
            "considering",
            r"i(?:'m| am) (?:seriously |currently |now )?(?:considering|thinking about|thinking of|looking forward to|planning on) (\w+ing\b.*)",
            "goal",
            Is,
            0.6,
        ),
        r(
            "dream-of",
            r"i (?:dream of|dream about|long to|can't wait to|cannot wait to) (.+)",
            "goal",
            Is,
            0.6,
        ),
        r(
            "job-seeking",
            r"i(?:'m| am) (?:now |currently |still )?(?:looking|searching) for (?:a |an )?(?:new |full[- ]time |part[- ]time |better )?(?:job|work)\b.*",
            "job",
            Is,
            0.75,
        ),
        r(
            "proud-to-be",
            r"i(?:'m| am) (?:very )?proud to be (?:an? )?(.+)",
            "identity",
            Is,
            0.75,
        ),
        r(
            "do-activity",
            r"i (?:often |usually |also |regularly |sometimes )?do (?:a lot of |some )?((?:\w+ )*?(?:yoga|pilates|crossfit|karate|judo|jiu jitsu|taekwondo|kung fu|boxing|kickboxing|crafts|puzzles|crosswords|\w+ing)\b.*)",
            "hobby",
            Is,
            0.65,
        ),
        // Life events that a profile keeps: a home bought, a baby on the
        // way, a role taken on, a prize won.
        r(
            "homeowner",
            r"i (?:just |recently |finally )?(?:bought|purchased|moved into) (?:a |an |my |our )?(?:first |own |brand new |new )*(?:house|home|condo)(?: (?:recently|last year|this year|last month|this month))?",
            "housing",
            Is,
            0.8,
        ),
        r(
            "expecting",
            r"i(?:'m| am)? (?:currently )?expecting (twins|triplets|quadruplets|a baby|a (?:baby )?(?:boy|girl)|(?:my|our) first (?:child|baby))\b.*",
            "family",
            Is,
            0.85,
        ),
        r(
            "became",
            r"i (?:just |recently |finally |have just |have recently )?became (?:a |an )(.+)",
            "identity",
            Is,
            0.75,
        ),
        r(
            "trained-as",
            r"i (?:have )?(?:just |recently )?(?:completed|finished) (?:my )?(?:education|training|studies|schooling|apprenticeship) as (?:a |an )?(.+)",
            "profession",
            Is,
            0.85,
        ),
        r(
            "spent-working",
            r"i (?:have )?spent (?:a decade|decades|(?:\w+ )?(?:years?|months?)) working (?:in|as|at|for) (?:an? |the )?(.+)",
            "job",
            Is,
            0.8,
        ),
        r(
            "won",
            r"i (?:just |recently |once |also )?won (?:a |an |the )?(.+)",
            "achievement",
            Is,
            0.75,
        ),
        r(
            "always-wanted",
            r"i(?:'ve| have)? always wanted (?:to (?:be |become )?)?(?:a |an )?(.+)",
            "goal",
            Is,
            0.65,
        ),
        // "I can" is a skill only with a verb that names one: "I can
        // drive a tractor", not "I can barely pay my bills".
        r(
            "can-skill",
            r"i (?:also |really )?can ((?:speak|play|drive|cook|swim|sing|dance|knit|sew|paint|draw|fly|ride|juggle|bake|ski|surf|skate|crochet|code)\b.*)",
            "skill",
            Is,
            0.7,
        ),
        r(
            "favorite-bare",
            r"(.+?) (?:is|are) (?:definitely |probably |one of )?my (?:all[- ]time )?(?:favou?rites?|favs?)",
            "likes",
            Like,
            0.85,
        ),
        r(
            "fluent",
            r"i(?:'m| am) (?:also )?(?:fluent|conversational) in (.+)",
            "languages",
            Is,
            0.9,
        ),
        r(
            "atheist",
            r"i (?:do not|don't|no longer) believe in (?:god|religion)\b.*",
            "religion",
            Is,
            0.8,
        ),
        r(
            "pregnant",
            r"i(?:'m| am) (?:currently |now )?(pregnant\b.*)",
            "family",
            Is,
            0.85,
        ),
        r(
            "belt",
            r"i (?:have|hold|earned|got) (?:a |an )?(?:\w+ )?(?:belt|dan) in (.+)",
            "hobby",
            Is,
            0.85,
        ),
        r(
            "volunteer",
            r"i (?:do |also |often |regularly )?(?:volunteer(?: work)?|help out) (?:for|at|with|in) (?:the |a |an )?(.+)",
            "volunteering",
            Is,
            0.8,
        ),
        r(
            "shared-home",
            r"i (?:share|rent|got|just got|recently got) (?:a |an |my )?((?:house|home|apartment|flat|room|place|dorm room) (?:in|with)\b.*)",
            "living situation",
            Is,
            0.75,
        ),
        r(
            "not-working",
            r"i (?:do not|don't|no longer|currently do not|currently don't) work(?: anymore| at the moment| right now| at all)?",
            "job",
            Is,
            0.75,
        ),
        // "I have been traveling the world for years": an activity kept up.
        r(
            "been-doing",
            r"i(?:'ve| have) (?:been|spent years) (\w+ing\b.*)",
            "activity",
            Is,
            0.6,
        ),
        r(
            "started-doing",
            r"i (?:took up (\w+ing\b.*)|(?:started|began) (\w+ing\b.*?) (?:when i was|at (?:the )?age|as a (?:kid|child|teen|teenager)|in (?:high school|college)|\w+ (?:years?|months?) ago|last (?:year|month|summer))\b.*)",
            "hobby",
            Is,
            0.7,
        ),
        r(
            "am-a",
            r"i(?:'m| am) (?:also |now |currently |still |actually |basically |naturally )?(?:a|an|the) (.+)",
            "identity",
            Is,
            0.6,
        ),
        r(
            "have-family",
            r"i have ((?:no|one|a|an|two|three|four|five|six|seven|eight|nine|ten|\d+) (?:(?:\w+ )?(?:kids?|child|children|sons?|daughters?|siblings?|brothers?|sisters?|grandchildren|grandkids|grandsons?|granddaughters?|twins?|stepsons?|stepdaughters?)|husband|wife|partner|boyfriend|girlfriend|fianc[ée]e?|father|mother|dad|mom|mum)\b.*)",
            "family",
            Is,
            0.85,
        ),
        // "I was born in the early 80s" is a time, not a place.
        r(
            "born-era",
            r"i was born in (?:the )?((?:early |late |mid |mid-)?(?:\d{2,4} ?'?s|\d{4}|\w+ties)\b.*)",
            "birth decade",
            Is,
            0.85,
        ),
        r(
            "born",
            r"i was (?:born|raised) (?:and raised )?(?:in|on|near) (.+)",
            "hometown",
            Is,
            0.85,
        ),
        r(
            "aversion",
            r"i have (?:an? )?(?:strong |deep |real |intense |serious |big )?(?:aversion to|dislike (?:for|of)|distaste for|hatred of|phobia of) (.+)",
            "dislikes",
            Dislike,
            0.85,
        ),
        r(
            "preference-have",
            r"i have (?:an? )?(?:strong |clear |definite |real |big )?(?:preference for|passion for|love (?:for|of)|soft spot for|weakness for) (.+)",
            "likes",
            Like,
            0.85,
        ),
        r(
            "allergy-have",
            r"i have (?:an? )?(?:severe |bad )?(?:allergy|allergies) to (.+)",
            "allergy",
            Is,
            0.9,
        ),
        r(
            "allergy-kind",
            r"i have (?:an? )?(?:severe |bad |serious |mild |life-threatening )?(\w+(?: \w+)?) (?:allergy|allergies|intolerance)\b.*",
            "allergy",
            Is,
            0.9,
        ),
        r(
            "sensitive",
            r"i(?:'m| am) (?:very |highly |extremely |quite )?(?:sensitive|intolerant) to (.+)",
            "allergy",
            Is,
            0.85,
        ),
        r(
            "religion",
            r"i(?:'m| am) (?:a |an )?(?:devout |practicing |practising )?(christian|buddhist|muslim|jewish|hindu|atheist|agnostic|catholic|protestant|mormon|sikh|pagan)\b.*",
            "religion",
            Is,
            0.9,
        ),
        r(
            "appearance",
            r"i have ((?:[\w-]+ ){0,5}(?:hair|eyes|skin|tattoos?|freckles|beard|mustache|moustache|piercings?|toes|dimples|birthmarks?|scars?)\b.*)",
            "physical appearance",
            Is,
            0.8,
        ),
        r(
            "spend-time",
            r"i spend (?:most of |a lot of |all of |much of )?(?:my )?(?:free |spare )?(?:time|days?|weekends|evenings) (.+)",
            "hobby",
            Is,
            0.7,
        ),
        r(
            "my-goal",
            r"my (?:dream|goal|ambition|plan)(?: in life)? is to (?:become |be )?(?:a |an )?(.+)",
            "career goal",
            Is,
            0.8,
        ),
        r(
            "my-job",
            r"my (?:job|profession|occupation|work) is (.+)",
            "job",
            Is,
            0.85,
        ),
        r(
            "pet-name",
            r"my (pet|dog|cat|puppy|kitten|parrot|bird|turtle|hamster|rabbit|horse|fish|snake|lizard)'?s? name is (.+)",
            "pet",
            Is,
            0.8,
        ),
        r(
            "spare-time",
            r"(?:in my (?:spare|free) time|when i have (?:some |any )?(?:spare|free) time),? i (.+)",
            "hobby",
            Is,
            0.75,
        ),
        r(
            "activity-verb",
            r"i (?:often |usually |always |regularly |also |sometimes |only |mostly |mainly )?(eat|drink|teach|speak|volunteer|attend|listen to|watch|ride|train|practice|practise|work out|exercise|meditate|rent|grow|raise|build|make|design|repair|sell|travel|visit|compete|shop|sew|coach|homeschool|foster|breed|restore|run|walk|jog|brew|fix|buy|produce) (.*)",
            "activity",
            Is,
            0.6,
        ),
        r(
            "raised-by",
            r"i was (?:raised|brought up|adopted) by (.+)",
            "family",
            Is,
            0.8,
        ),
        r(
            "dropout",
            r"i (?:never finished|never graduated from|did not finish|didn't finish|did not graduate(?: from)?|didn't graduate(?: from)?|dropped out of|quit) (high school|school|college|university)\b.*",
            "education",
            Is,
            0.85,
        ),
        r(
            "graduated",
            r"i (?:just |recently )?graduated (?:from |with |in )?(.+)",
            "education",
            Is,
            0.85,
        ),
        r(
            "moving",
            r"i(?:'m| am| will be|'ll be) (?:moving|relocating) to (.+)",
            "location",
            Is,
            0.7,
        ),
        r(
            "career-goal",
            r"i (?:want|plan|hope|am planning|'m planning|am hoping|'m hoping|am going|'m going|am studying|'m studying|am training|'m training) to (?:be|become) (?:a |an )?(.+)",
            "career goal",
            Is,
            0.6,
        ),
        r(
            "goal",
            r"i (?:really |still )?(?:want|plan|am planning|'m planning|intend) to (.+)",
            "goal",
            Is,
            0.5,
        ),
        r(
            "heritage",
            r"i(?:'m| am) of (?:the )?(.+?) (?:faith|religion|descent|heritage|origin)",
            "background",
            Is,
            0.8,
        ),
        r(
            "not-religious",
            r"i(?:'m| am) not (religious|spiritual|a believer)",
            "religion",
            Is,
            0.8,
        ),
        r(
            "health-have",
            r"i (?:have|had|suffer from|live with|was diagnosed with) (?:a |an )?((?:\w+ ){0,2}(?:diabetes|asthma|adhd|autism|anxiety|depression|epilepsy|arthritis|cancer|migraines?|insomnia|dyslexia|ocd|ptsd|disability|illness|disease|syndrome|disorder|hearing loss|back pain|chronic pain|stutter|lisp|broken (?:arm|leg|wrist|ankle|hand|foot|rib|nose|collarbone))\b.*)",
            "health condition",
            Is,
            0.75,
        ),
        r(
            "used-to",
            r"i used to (?:be |work as |live in )?(?:a |an |in )?(.+)",
            "past",
            Is,
            0.6,
        ),
        r(
            "go-to",
            r"i (?:often |usually |always |regularly )?go to (.+)",
            "routine",
            Is,
            0.6,
        ),
        r(
            "age-decade",
            r"i(?:'m| am) (in my (?:early |mid |late )?(?:teens|twenties|thirties|forties|fifties|sixties|seventies|eighties|nineties|\d0s))\b.*",
            "age",
            Is,
            0.85,
        ),
        r(
            "service",
            r"i(?:'m| am) (?:currently |now )?(?:in|serving in|enlisted in) the ((?:us |u\.s\. |british |royal )?(?:army|navy|air force|marines|marine corps|military|national guard|coast guard|reserves)\b.*)",
            "profession",
            Is,
            0.85,
        ),
        r(
            "employed-by",
            r"i(?:'m| am) (?:currently |now )?(?:employed|hired) (?:by|at) (.+)",
            "job",
            Is,
            0.85,
        ),
        r(
            "retired",
            r"i(?:'m| am|'ve been| have been) (?:now |recently |happily )?(retired(?: from .+| for .+)?)",
            "profession",
            Is,
            0.8,
        ),
        r(
            "degree",
            r"i (?:have|hold|earned|got|finished|completed) (?:a |an |my )?(.+? degree\b.*)",
            "education",
            Is,
            0.85,
        ),
        r(
            "collection",
            r"i have (?:a |an )?(?:large |huge |big |small |growing |nice )?collection of (.+)",
            "hobby",
            Is,
            0.75,
        ),
        r(
            "collection-have",
            r"i have (?:a |an )?(?:large |huge |big |small |growing |nice )?(\w+(?: \w+)?) collection\b.*",
            "hobby",
            Is,
            0.75,
        ),
        r(
            "learning",
            r"i(?:'m| am) (?:currently |now |slowly )?learning ((?:to |how to )?.+)",
            "hobby",
            Is,
            0.7,
        ),
        r(
            "school",
            r"i(?:'m| am) (?:currently |now )?(?:going to|attending|in|enrolled in) ((?:\w+ ){0,3}(?:school|college|university|grad school|med school|law school|grade)\b.*)",
            "education",
            Is,
            0.75,
        ),
        // A verb phrase with a frequency is a habit: "I lift weights every
        // weekend", "I take dance lessons once a week". The frequency is
        // what makes it one, so "I lift weights" alone does not match.
        r(
            "habit",
            r"i (?:usually |often |always |also |still |try (?:and|to) )?([a-z]+(?: [a-z']+){0,4}?) (?:every (?:single )?(?:day|week|weekend|morning|afternoon|evening|night|month|year|summer|winter|sunday|saturday)|each (?:day|week|weekend|month)|daily|weekly|regularly|on (?:the )?weekends|a lot|every (?:\w+ )?(?:days|weeks|months|years)|(?:once|twice|(?:a|one|two|three|four|five|\d+) times?) a (?:day|week|month|year)|(?:a|one|two|three|four|five|six|\d+) days? a week)\b.*",
            "hobby",
            Is,
            0.6,
        ),
        r(
            "am-trait",
            r"i(?:'m| am) (?:very |really |quite |pretty |so |a bit |kind of )?((?:\w+)(?: \w+)?(?: and (?:\w+))?)",
            "personality trait",
            Is,
            0.5,
        ),
    ]
});

static HYPOTHETICAL: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:if i|if you|i wish|i'd|i would|would i|were i|imagine|suppose|supposing|let's say|let us say|pretend|hypothetically|in a (?:dream|parallel)|someday i might|i might|maybe i|i could see myself|i hope to)\b",
    )
});
static QUESTION_START: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)^(?:what|who|where|when|why|how|which|do|does|did|can|could|would|should|is|are|am|will|shall|may|have you|has)\b",
    )
});
/// Someone else's words, reported: "…, said my nephew".
static REPORTED: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)[,;]\s*(?:said|says|asked|asks|told me|tells me|wrote|writes) (?:my|our|his|her|their|the|a|an)?\s*\w+\s*$",
    )
});
/// People, who are never pets.
static PERSON_NOUN: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:friend|brother|sister|son|daughter|kid|child|boy|girl|boyfriend|girlfriend|husband|wife|partner|cousin|uncle|aunt|nephew|niece|neighbou?r|roommate|teacher|boss|colleague|coworker|baby|man|woman|guy|person)s?$",
    )
});
/// Sentences that are about someone else, even when they start with "my".
static OTHER_PERSON: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)^(?:my|our) (?:(?:little|older|younger|big|best|eldest|youngest|step|ex|twin|late|dear|new|old) )?(?:brother|sister|mom|mum|mother|dad|father|parents?|wife|husband|partner|boyfriend|girlfriend|friends?|son|daughter|kids?|children|boss|colleague|coworker|co-worker|neighbou?r|roommate|flatmate|uncle|aunt|cousin|grand(?:ma|pa|mother|father|parents)|family|fianc[ée]e?|teacher|doctor)s?\b",
    )
});
static LEADING_FILLER: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)^(?:(?:(?:hey|hi|hello)(?: there)?|well|also|actually|honestly|so|and|but|oh|yeah|yes|no|ok|okay|anyway|btw|by the way|fun fact|for the record|to be honest|personally|these days|lately|nowadays|now|on (?:the )?weekends|at weekends|on (?:sundays|saturdays)|for (?:vacation|holidays?)|on (?:vacation|holiday)|in the (?:summers?|winters?|spring|fall|autumn|evenings?|mornings?)|at night|after work|during the (?:week|day)|every (?:weekend|summer|winter|morning|evening)|most days|when i grow up)\b[,:]?\s*)+",
    )
});
/// "I don t like", "I m": an apostrophe lost on the way (exports and
/// transcriptions drop it), put back so the rules read the sentence.
static APOSTROPHE_LOST: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?i)\b(don|doesn|didn|can|won|isn|wasn|i) (t|m|ve|ll|d)\b"));
/// The verb a liking starts with when chat drops its subject.
const LIKING_VERB: &str = r"(?i)^(?:(?:really|absolutely|totally|just|also) )?(?:love|enjoy|adore|hate|dislike|can't stand)";
/// A liking stated without its subject ("Love hiking").
static SUBJECTLESS: LazyLock<Regex> = LazyLock::new(|| re(&format!(r"{LIKING_VERB}\s")));
/// …that is a reaction to something said, not a preference.
static SUBJECTLESS_REACTION: LazyLock<Regex> = LazyLock::new(|| {
    re(&format!(
        r"{LIKING_VERB}(?: to)? (?:it|that|this|when|how|what|you|your|the way|the idea|the new|hearing|seeing|hear|see|reading that|say|admit|bother|interrupt|ask|help|be)\b"
    ))
});
/// "I'm sorry", "I'm back", "I'm going": states of the moment, not traits.
static NOT_A_TRAIT: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)^(?:sorry|glad|happy|here|back|not|just|going|on|reading|sure|able|unable|trying|looking|wondering|done|ready|fine|ok|okay|new|home|out|off|in|at|about|also|still|now|late|early|busy|tired|hungry|thirsty|bored|confused|curious|afraid|excited|thinking|working|testing|leaving|coming|waiting|listening|writing|asking|talking|an?|the|my|your|this|that|it|so|very|really)\b",
    )
});

/// Clauses and words after the target that are not part of it.
static TRAILING: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)(?:,|;| -| –| —)?\s+(?:but|because|since|though|although|when|whenever|which|who|so that|and i|and it|and they|as well|too|so much|very much|more than anything|these days|nowadays|lately|right now|now|last (?:year|month|week)|this year|every (?:single )?(?:day|week|weekend|sunday|saturday|morning|afternoon|evening|night|month|year|summer|winter)|each (?:day|week|month)|daily|regularly|occasionally|on (?:the )?weekends|at the moment|in my (?:spare|free) time|(?:once|twice|\w+ times?) a (?:day|week|month|year)|\w+ days? a week|\w+ (?:years?|months?|weeks?) ago|to (?:relax|unwind|de-?stress|relieve stress|stay (?:fit|healthy|in shape)|keep fit|pay (?:for|the) )|for (?:a living|fun|years|a while)|for (?:a|\w+) (?:years?|months?|weeks?|decades?)|(?:a|\w+) times|due to|to (?:help )?(?:pay|make ends meet|supplement|earn)|in (?:high school|college)|at night|during the day|yesterday|today|last night|and (?:have|has|had|am|was|live|lives|work|works|go|goes)\b|(?:and|but) (?:he|she|we|they)\b|(?:and|but) (?:my|our|his|her|their) (?:\w+ )?(?:brother|sister|mom|mum|mother|dad|father|parents?|wife|husband|partner|boyfriend|girlfriend|friends?|son|daughter|kids?|children|family|boss|roommate)s?\b)\b.*$",
    )
});

fn clean_target(raw: &str) -> String {
    let t = raw
        .trim()
        .trim_end_matches(['.', '!', ',', ';', ':', ')', '"', '\'']);
    let cut = TRAILING.replace(t, "");
    let cut = cut
        .trim()
        .trim_end_matches(['.', '!', ',', ';', ':'])
        .trim();
    // "the who" is a band, not "the" followed by a relative clause.
    if normalise(cut).is_empty() {
        t.trim().to_string()
    } else {
        cut.to_string()
    }
}

/// Routines that are not pastimes or traits: "I check my email every day".
static NOT_A_HABIT: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)^(?:can|cannot|can't|could|will|would|should|must|may|might|do|don't|did|be|am|was|have|had|get|feel|think|need|want|check|call|text|e-?mail|see|wake|sleep|work|pay|shower|use|change|clean|sigh|cry|forget|lose|barely|never|hardly)\b",
    )
});

/// "I have been thinking about it", "I have been waiting": the moment,
/// not an activity kept up.
static NOT_AN_ONGOING_ACTIVITY: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)^(?:thinking|wondering|trying|meaning|waiting|looking|going|feeling|getting|having|asking|hoping|planning|considering|reading about|told|doing|working|busy|sitting|sleeping|struggling|dealing|using|testing|running into|seeing|hearing|saying|telling|talking about)\b",
    )
});

/// "I can play that again", "I can cook dinner tonight".
static NOT_A_STANDING_SKILL: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)^\w+ (?:that|this|it|them|those|these|there|again)\b|\b(?:tonight|tomorrow|today|later|now|soon|here|right now|this (?:morning|afternoon|evening|week|weekend)|next (?:week|time))\b",
    )
});
static DEMONSTRATIVE: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?i)^(?:this|that|these|those|it|which|one)\b"));

/// What an assistant, not a person with a skill, knows how to do.
static NOT_A_SKILL: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)^(?:help|answer|do (?:that|this|it)|fix (?:that|this|it)|solve|explain|use (?:it|this|that)|handle|find|get there|deal with)\b",
    )
});

/// "-ing" words that are not activities: "I do something about it".
static NOT_AN_ACTIVITY: LazyLock<Regex> = LazyLock::new(|| {
    re(r"(?i)^(?:something|anything|nothing|everything|the same thing|my thing|things|not|never)\b")
});

/// A verb phrase as a noun phrase, the way a profile names an activity:
/// "swim" → "swimming", "go hiking" → "hiking", "bake bread" → "baking
/// bread". A phrase that already starts with a gerund is kept.
pub fn gerund_phrase(phrase: &str) -> String {
    let phrase = phrase.trim();
    let (first, rest) = phrase.split_once(' ').unwrap_or((phrase, ""));
    // "go hiking" → "hiking".
    if first.eq_ignore_ascii_case("go")
        && rest.split(' ').next().is_some_and(|w| w.ends_with("ing"))
    {
        return rest.to_string();
    }
    let verb = gerund(first);
    if rest.is_empty() {
        verb
    } else {
        format!("{verb} {rest}")
    }
}

fn gerund(verb: &str) -> String {
    let lower = verb.to_ascii_lowercase();
    let is_vowel = |c: u8| matches!(c, b'a' | b'e' | b'i' | b'o' | b'u');
    let b = lower.as_bytes();
    if lower.ends_with("ing") && lower.len() > 4
        || !lower.bytes().all(|c| c.is_ascii_alphabetic())
        || b.len() < 2
    {
        return verb.to_string();
    }
    if lower == "be"
        || lower == "see"
        || lower.ends_with("ee")
        || lower.ends_with("ye")
        || lower.ends_with("oe")
    {
        return format!("{verb}ing");
    }
    if let Some(stem) = lower.strip_suffix("ie") {
        return format!("{stem}ying");
    }
    if let Some(stem) = lower.strip_suffix('e') {
        return format!("{stem}ing");
    }
    // One-syllable consonant–vowel–consonant verbs double their last
    // letter: "swim" → "swimming", "jog" → "jogging" (not w, x or y:
    // "sew" → "sewing").
    let n = b.len();
    let vowel_groups = b
        .iter()
        .enumerate()
        .filter(|&(i, &c)| is_vowel(c) && (i == 0 || !is_vowel(b[i - 1])))
        .count();
    if n >= 3
        && vowel_groups == 1
        && !is_vowel(b[n - 1])
        && !matches!(b[n - 1], b'w' | b'x' | b'y')
        && is_vowel(b[n - 2])
        && !is_vowel(b[n - 3])
    {
        return format!("{verb}{}ing", &lower[n - 1..]);
    }
    format!("{verb}ing")
}

/// Splits a message into sentences, keeping each one's exact text.
pub fn sentences(message: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = message.as_bytes();
    for (i, c) in message.char_indices() {
        let end_of_sentence = matches!(c, '!' | '?' | '\n')
            || (c == '.'
                && bytes
                    .get(i + 1)
                    .is_none_or(|n| n.is_ascii_whitespace() || *n == b'"'));
        if end_of_sentence {
            let s = message[start..i + c.len_utf8()].trim();
            if !s.is_empty() {
                out.push(s);
            }
            start = i + c.len_utf8();
        }
    }
    let rest = message[start..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// Why a sentence was passed over (for the eval report and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    Question,
    Hypothetical,
    Quoted,
    OtherPerson,
    NoRule,
}

/// Every candidate of one sentence, or why it has none. A sentence can
/// state several things: "My name is Larry and I am a chef", "I am from
/// California but I live in Florida". The first candidate is the one
/// `extract_sentence` gives; the others come from the sentence's "and" /
/// "but" clauses, each read on its own with the rules' gates, and are kept
/// when they name something the first one does not.
pub fn extract_sentence_all(sentence: &str) -> Result<Vec<Candidate>, Skip> {
    let first = extract_sentence(sentence)?;
    let mut found = vec![first];
    let body = restore_apostrophes(without_filler(sentence.trim()));
    for clause in CLAUSE_BREAK.split(&body).skip(1) {
        let Some(own) = own_clause(clause) else {
            continue;
        };
        let Some(c) = match_rules(&own, sentence.trim()) else {
            continue;
        };
        let new_words = normalise(&c.target);
        let already = found.iter().any(|f| {
            let known = normalise(&f.target);
            new_words.iter().all(|w| known.contains(w))
        });
        if !already {
            found.push(c);
        }
    }
    Ok(found)
}

/// Where a sentence's clauses meet: "…, and I…", "… but I…".
static CLAUSE_BREAK: LazyLock<Regex> = LazyLock::new(|| re(r"(?i),?\s+(?:and|but)\s+"));

/// A clause as a sentence of its own, its subject given back ("live in
/// oklahoma" → "i live in oklahoma"); None when it is about someone else.
fn own_clause(clause: &str) -> Option<String> {
    let clause = clause.trim();
    if OTHER_PERSON.is_match(clause) || HYPOTHETICAL.is_match(clause) {
        return None;
    }
    let lower = clause.to_ascii_lowercase();
    Some(
        if lower.starts_with("i ") || lower.starts_with("i'") || lower.starts_with("my ") {
            clause.to_string()
        } else {
            format!("i {clause}")
        },
    )
}

/// The sentence without its opening filler ("Well, ", "Honestly ") and
/// closing punctuation.
fn without_filler(trimmed: &str) -> &str {
    let start = LEADING_FILLER
        .find(trimmed)
        .filter(|m| m.start() == 0)
        .map_or(0, |m| m.end());
    trimmed[start..].trim().trim_end_matches(['.', '!']).trim()
}

/// "I’m" with a typographic apostrophe, and "I m" / "don t" with a lost
/// one, as "I'm" and "don't", so one set of rules reads them all.
fn restore_apostrophes(body: &str) -> String {
    APOSTROPHE_LOST
        .replace_all(&body.replace('’', "'"), "${1}'${2}")
        .into_owned()
}

/// Extracts the main candidate of one sentence, or says why it has none.
pub fn extract_sentence(sentence: &str) -> Result<Candidate, Skip> {
    let trimmed = sentence.trim();
    if trimmed.ends_with('?') {
        return Err(Skip::Question);
    }
    if trimmed.starts_with(['"', '“', '\'', '>', '«']) {
        return Err(Skip::Quoted);
    }
    let body = without_filler(trimmed);
    // "Am I…" without a question mark is still a question; "When I have
    // time I paint" is a statement.
    let lower = body.to_ascii_lowercase();
    if QUESTION_START.is_match(body) && !lower.starts_with("am ") && !lower.starts_with("when i ") {
        return Err(Skip::Question);
    }
    if REPORTED.is_match(body) {
        return Err(Skip::Quoted);
    }
    if HYPOTHETICAL.is_match(body) {
        return Err(Skip::Hypothetical);
    }
    if OTHER_PERSON.is_match(body) {
        return Err(Skip::OtherPerson);
    }
    let body = restore_apostrophes(body);
    // Chat drops the subject: "Love to read drama books" is "I love to
    // read drama books". Not "Love it" or "Hate when that happens", which
    // name nothing.
    let body = if SUBJECTLESS.is_match(&body) && !SUBJECTLESS_REACTION.is_match(&body) {
        format!("i {body}")
    } else {
        body
    };
    if let Some(c) = match_rules(&body, trimmed) {
        return Ok(c);
    }
    // "I am native american and live in oklahoma": each clause on its own,
    // with its subject given back ("live in oklahoma" → "i live in
    // oklahoma"). Only when the whole sentence matched nothing, so a rule
    // that reads "and" as part of its target keeps doing so.
    for clause in body.split(" and ").skip(1) {
        let Some(own) = own_clause(clause) else {
            continue;
        };
        if let Some(c) = match_rules(&own, trimmed) {
            return Ok(c);
        }
    }
    if let Some((first, _)) = body.split_once(" and ") {
        if let Some(c) = match_rules(first.trim(), trimmed) {
            return Ok(c);
        }
    }
    Err(Skip::NoRule)
}

/// The first rule that matches `body` (a cleaned sentence or clause), as a
/// candidate whose evidence is the whole sentence.
fn match_rules(body: &str, sentence: &str) -> Option<Candidate> {
    for rule in RULES.iter() {
        let Some(c) = rule.pattern.captures(body) else {
            continue;
        };
        let group = |i: usize| c.get(i).map(|m| m.as_str()).unwrap_or("");
        let (attribute, target) = match rule.attribute {
            "$1" => (group(1).to_string(), group(2).to_string()),
            "$2<-$1" => (group(2).to_string(), group(1).to_string()),
            fixed => (fixed.to_string(), group(1).to_string()),
        };
        let target = match rule.name {
            // The verb is part of the hobby: "play chess", "collect stamps".
            "pet-name" => format!("{} named {}", group(1), clean_target(group(2))),
            // The animal is the preference; its name is not ("a turtle
            // named Timothy" → "turtle").
            "pet" => {
                let t = clean_target(&target);
                match t.split_once(" named ").or_else(|| t.split_once(" called ")) {
                    Some((animal, _)) => animal.trim().to_string(),
                    None => t,
                }
            }
            "dropout" => format!("{} dropout", group(1).to_ascii_lowercase()),
            "collection" | "collection-have" => format!("collecting {}", clean_target(group(1))),
            // Rules whose sentence names the preference without a span to
            // copy: "I have a big sweet tooth" → sweets.
            "sweet-tooth" => "sweets".into(),
            "childfree" => "childfree".into(),
            "atheist" => "atheist".into(),
            "not-working" => "not working".into(),
            "garden" => "gardening".into(),
            "job-seeking" => "job seeking".into(),
            "remote" => "working from home".into(),
            "on-diet" => match c.get(1) {
                Some(kind) => format!("{} diet", kind.as_str()),
                None => "dieting".into(),
            },
            "homeowner" => "homeowner".into(),
            "started-doing" => gerund_phrase(&clean_target(
                c.get(1).or(c.get(2)).map_or("", |m| m.as_str()),
            )),
            // "My favorite way to relax is to read a book" → "reading a book".
            "favorite" | "my-hobby" => {
                let t = clean_target(&target);
                match t.strip_prefix("to ") {
                    Some(activity) => gerund_phrase(activity),
                    None => t,
                }
            }
            "expecting" => format!("expecting {}", group(1).to_ascii_lowercase()),
            "know-how" | "as-a-hobby" | "can-skill" => gerund_phrase(&clean_target(group(1))),
            "learning" => format!("learning {}", clean_target(group(1))),
            // The activity as a noun phrase: "play chess" → "playing chess".
            "hobby-verb" | "activity-verb" => {
                let verb = group(1);
                let verb = if verb.eq_ignore_ascii_case("played") {
                    "play"
                } else {
                    verb
                };
                gerund_phrase(&format!("{verb} {}", clean_target(group(2))))
            }
            "habit" | "spare-time" => gerund_phrase(&clean_target(group(1))),
            _ => clean_target(&target),
        };
        let attribute = attribute.trim().to_ascii_lowercase();
        if rule.name == "am-trait" && NOT_A_TRAIT.is_match(&target) {
            continue;
        }
        // "I have a friend named Sam" is not a pet.
        if rule.name == "pet-named" && PERSON_NOUN.is_match(&target) {
            continue;
        }
        if target.is_empty() || target.split_whitespace().count() > 12 || attribute.is_empty() {
            continue;
        }
        // "I care about getting this right for you", "I do not want to keep
        // you waiting": about the listener, which is not a preference.
        if target
            .split(|c: char| !c.is_alphanumeric() && c != '\'')
            .any(|w| {
                matches!(
                    w.to_ascii_lowercase().as_str(),
                    "you" | "your" | "yours" | "you're"
                )
            })
        {
            continue;
        }
        // "Love it", "I do not drink or do drugs": nothing is named.
        let first_word = target
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        if normalise(&target).is_empty() || matches!(first_word.as_str(), "or" | "and" | "to") {
            continue;
        }
        // "I can play that again", "I can cook dinner tonight": a thing
        // to do now, not a skill.
        if rule.name == "can-skill" && NOT_A_STANDING_SKILL.is_match(group(1)) {
            continue;
        }
        // "This one is my favorite" points at something said before.
        if rule.name == "favorite-bare" && DEMONSTRATIVE.is_match(&target) {
            continue;
        }
        // "I know how to help you with that" is the assistant talking.
        if rule.name == "know-how" && NOT_A_SKILL.is_match(group(1)) {
            continue;
        }
        // "I do nothing all day" names no activity.
        if rule.name == "do-activity" && NOT_AN_ACTIVITY.is_match(&target) {
            continue;
        }
        if matches!(rule.name, "been-doing" | "started-doing")
            && NOT_AN_ONGOING_ACTIVITY.is_match(&target)
        {
            continue;
        }
        if rule.name == "habit" && NOT_A_HABIT.is_match(group(1)) {
            continue;
        }
        // "I like to dance" is a hobby (the verb right after "like to"),
        // "I like Radiohead" a liking; "I prefer tea to coffee" is not a verb.
        let infinitive = c
            .get(1)
            .is_some_and(|m| body[..m.start()].to_ascii_lowercase().ends_with(" to "));
        let hobby = rule.name == "like"
            && (target
                .split_whitespace()
                .next()
                .is_some_and(|w| w.ends_with("ing"))
                || infinitive);
        let (attribute, target) = if hobby {
            ("hobby".to_string(), gerund_phrase(&target))
        } else {
            (attribute, target)
        };
        return Some(Candidate {
            attribute,
            target,
            polarity: rule.polarity,
            confidence: rule.confidence,
            evidence: sentence.to_string(),
            rule: rule.name,
        });
    }
    None
}

/// Every candidate in a user message. Each candidate's evidence is a span
/// of `message`; any that is not (it cannot happen with these rules, but
/// the LLM extractor will share this check) is dropped.
pub fn extract(message: &str) -> Vec<Candidate> {
    sentences(message)
        .into_iter()
        .filter_map(|s| extract_sentence_all(s).ok())
        .flatten()
        .filter(|c| message.contains(&c.evidence))
        .collect()
}

const STOP: &[&str] = &[
    "a", "an", "the", "my", "to", "of", "in", "at", "on", "for", "and", "with", "i", "is", "are",
    "am", "be", "it", "its", "as", "by", "from", "me", "very", "really", "that", "this",
];

fn stem(w: &str) -> String {
    for suffix in ["ings", "ing", "ers", "er", "es", "ed", "s", "e"] {
        if let Some(s) = w.strip_suffix(suffix) {
            if s.len() >= 3 {
                return s.to_string();
            }
        }
    }
    w.to_string()
}

/// The normalised bag of words preferences are compared by: lower case,
/// split on non-alphanumerics, no stop words, a light suffix stemmer
/// ("dancing", "dance" → "danc"). Used to dedupe captured preferences
/// and by `imprint eval extract`'s matching rule.
pub fn normalise(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && !STOP.contains(w))
        .map(stem)
        .collect()
}

/// Token F1 between the normalised bags of two strings.
pub fn match_f1(predicted: &str, gold: &str) -> f64 {
    bag_f1(&normalise(predicted), &normalise(gold))
}

/// SQuAD-style F1 of two bags of words (0 when either is empty).
pub fn bag_f1<S: PartialEq>(predicted: &[S], gold: &[S]) -> f64 {
    if predicted.is_empty() || gold.is_empty() {
        return 0.0;
    }
    let mut remaining: Vec<&S> = gold.iter().collect();
    let mut common = 0usize;
    for w in predicted {
        if let Some(i) = remaining.iter().position(|x| *x == w) {
            remaining.swap_remove(i);
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / predicted.len() as f64;
    let recall = common as f64 / gold.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Candidate {
        extract_sentence(text).unwrap_or_else(|skip| panic!("{text:?} skipped: {skip:?}"))
    }

    /// Each sentence yields (attribute, target), with the whole sentence as
    /// its evidence.
    fn assert_extracts(cases: &[(&str, &str, &str)]) {
        for &(sentence, attribute, target) in cases {
            let c = one(sentence);
            assert_eq!(
                (c.attribute.as_str(), c.target.as_str()),
                (attribute, target),
                "{sentence}"
            );
            assert_eq!(c.evidence, sentence, "the evidence is the whole sentence");
        }
    }

    #[test]
    fn activities_are_named_as_gerunds() {
        for (verb, gerund) in [
            ("swim", "swimming"),
            ("jog", "jogging"),
            ("knit", "knitting"),
            ("hike", "hiking"),
            ("bake bread", "baking bread"),
            ("sew", "sewing"),
            ("play chess", "playing chess"),
            ("visit museums", "visiting museums"),
            ("cook", "cooking"),
            ("eat sushi", "eating sushi"),
            ("tie flies", "tying flies"),
            ("ski", "skiing"),
            ("go fishing", "fishing"),
            ("dancing at clubs", "dancing at clubs"),
            ("sing", "singing"),
        ] {
            assert_eq!(gerund_phrase(verb), gerund, "{verb}");
        }
    }

    #[test]
    fn more_first_person_phrasings_are_read() {
        assert_extracts(&[
            (
                "I do like watching cooking shows.",
                "hobby",
                "watching cooking shows",
            ),
            ("I do not drink soda.", "dislikes", "soda"),
            (
                "I also write diet cookbooks.",
                "hobby",
                "writing diet cookbooks",
            ),
            (
                "I played football for my college.",
                "hobby",
                "playing football for my college",
            ),
            ("I also study languages.", "education", "languages"),
            ("I have 5cats.", "pet", "cats"),
            (
                "I drive a nissan pathfinder.",
                "vehicle",
                "nissan pathfinder",
            ),
            (
                "My main transportation is my motorbike.",
                "vehicle",
                "motorbike",
            ),
            (
                "I spend most of my day at the library.",
                "hobby",
                "at the library",
            ),
            ("I am happy being single.", "relationship status", "single"),
            (
                "I buy only organic food.",
                "activity",
                "buying only organic food",
            ),
            (
                "I just had knee surgery.",
                "health condition",
                "knee surgery",
            ),
            ("I have a broken arm.", "health condition", "broken arm"),
            (
                "I am interested in photography and like taking pictures.",
                "interest",
                "photography",
            ),
            ("I care deeply about politics.", "interest", "politics"),
            ("Knitting is my passion.", "hobby", "Knitting"),
            ("I know how to sew quilts.", "skill", "sewing quilts"),
            ("I was on the soccer team in college.", "sport", "soccer"),
            (
                "I try various teas as a hobby.",
                "hobby",
                "trying various teas",
            ),
            ("I have a big sweet tooth.", "food preference", "sweets"),
            ("I do not want kids.", "family", "childfree"),
            ("I have a large vegetable garden.", "hobby", "gardening"),
            (
                "My dream car is a rolls royce ghost.",
                "aspiration",
                "rolls royce ghost",
            ),
            (
                "My role model is my grandmother.",
                "role model",
                "my grandmother",
            ),
            ("I am on a diet now.", "diet", "dieting"),
            ("I'm on a keto diet.", "diet", "keto diet"),
            (
                "I am considering going back to college.",
                "goal",
                "going back to college",
            ),
            (
                "I dream of moving to the city.",
                "goal",
                "moving to the city",
            ),
            ("I am now looking for a new job.", "job", "job seeking"),
            (
                "I have a hat collection of over 1000 hats.",
                "hobby",
                "collecting hat",
            ),
            ("I am proud to be an american.", "identity", "american"),
            (
                "I do live action roleplaying.",
                "hobby",
                "live action roleplaying",
            ),
            ("My favorite band is the who.", "band", "the who"),
            ("I work from home.", "work arrangement", "working from home"),
            ("I have two part time jobs.", "job", "two part time jobs"),
            (
                "I have been retired for ten years.",
                "profession",
                "retired",
            ),
            (
                "Hello i just moved here from germany.",
                "hometown",
                "germany",
            ),
            (
                "I went to college at university of mississippi.",
                "education",
                "university of mississippi",
            ),
            (
                "Now i live in the united states.",
                "location",
                "the united states",
            ),
        ]);
        // What the new rules must leave alone.
        for sentence in [
            "I know how to help you with that.",
            "I do something about it every time.",
            "I do not want to go there.",
            "I do not want to keep you waiting.",
            "I care about getting this right for you.",
        ] {
            assert!(extract_sentence(sentence).is_err(), "{sentence}");
        }
    }

    #[test]
    fn life_events_skills_and_dropped_subjects_are_read() {
        assert_extracts(&[
            ("I just bought a brand new house.", "housing", "homeowner"),
            ("I just moved into my first home.", "housing", "homeowner"),
            (
                "I am expecting twins in two months.",
                "family",
                "expecting twins",
            ),
            (
                "I am pregnant with my first child.",
                "family",
                "pregnant with my first child",
            ),
            (
                "I just became a first time father.",
                "identity",
                "first time father",
            ),
            ("I am four years old.", "age", "four"),
            ("I turned 18 years old yesterday.", "age", "18"),
            ("I was born in the early 80s.", "birth decade", "early 80s"),
            (
                "I won homecoming queen this year.",
                "achievement",
                "homecoming queen",
            ),
            ("I can drive a tractor.", "skill", "driving a tractor"),
            ("I do not care about fashion.", "dislikes", "fashion"),
            ("Love to read drama books.", "hobby", "reading drama books"),
            (
                "On weekends i do live action roleplaying events.",
                "hobby",
                "live action roleplaying events",
            ),
            (
                "For vacation i enjoy time at the beach.",
                "likes",
                "time at the beach",
            ),
            (
                "When i grow up i want to be a physical therapist.",
                "career goal",
                "physical therapist",
            ),
            ("I am studying to be a lawyer.", "career goal", "lawyer"),
            (
                "I also work as a custodian to help pay the bills.",
                "profession",
                "custodian",
            ),
            (
                "I also have a dog walking business.",
                "business",
                "dog walking business",
            ),
            ("I have always wanted a big family.", "goal", "big family"),
            (
                "I have light skin with big brown eyes.",
                "physical appearance",
                "light skin with big brown eyes",
            ),
            (
                "I am terrified of clowns due to childhood trauma.",
                "fear",
                "clowns",
            ),
            ("I worked at hollister in high school.", "job", "hollister"),
            ("I love cats and have two cats.", "likes", "cats"),
            (
                "My favorite way to relax is to read a book.",
                "way to relax",
                "reading a book",
            ),
            ("Horror movies are my favorites.", "likes", "Horror movies"),
            (
                "I am fluent in english spanish and french.",
                "languages",
                "english spanish and french",
            ),
            ("I do not believe in god.", "religion", "atheist"),
            ("I have a black belt in karate.", "hobby", "karate"),
            (
                "I help out at the food bank occasionally.",
                "volunteering",
                "food bank",
            ),
            (
                "I started playing guitar when i was three.",
                "hobby",
                "playing guitar",
            ),
            (
                "I have been traveling the world for a years.",
                "activity",
                "traveling the world",
            ),
            ("I don t like my reputation.", "dislikes", "my reputation"),
            (
                "I share an apartment in seattle with two roommates.",
                "living situation",
                "apartment in seattle with two roommates",
            ),
            ("I have a ford f150.", "vehicle", "ford f150"),
        ]);
        for sentence in [
            "Love it, thanks!",
            "Hate when that happens.",
            "I can cook dinner tonight.",
            "I can play it again later.",
            "This one is my favorite!",
            "I have been waiting for the bus for twenty minutes.",
            "I started reading the docs this morning.",
            "I just bought a new home printer.",
            "I am expecting a package tomorrow.",
            "I don't work on weekends, so Saturday is fine.",
            "I do not drink or do drugs or anything.",
            "Hate to say it, but the build is broken again.",
            "Love to help with that.",
        ] {
            assert!(extract_sentence(sentence).is_err(), "{sentence}");
        }
    }

    #[test]
    fn a_sentence_can_state_several_preferences() {
        let all = |s: &str| -> Vec<(String, String)> {
            extract_sentence_all(s)
                .unwrap_or_else(|skip| panic!("{s}: {skip:?}"))
                .into_iter()
                .map(|c| {
                    assert_eq!(c.evidence, s, "the evidence is the whole sentence");
                    (c.attribute, c.target)
                })
                .collect()
        };
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, t)| (a.to_string(), t.to_string()))
                .collect()
        };
        assert_eq!(
            all("Hey my name is Larry and I am a chef."),
            pairs(&[("name", "Larry"), ("identity", "chef")])
        );
        assert_eq!(
            all("I am originally from california but i live in florida."),
            pairs(&[("hometown", "california"), ("location", "florida")])
        );
        assert_eq!(
            all("I love dogs but hate cats."),
            pairs(&[("likes", "dogs"), ("dislikes", "cats")])
        );
        // Clauses about someone else, or naming nothing, add nothing.
        assert_eq!(
            all("I love my job and my wife loves hers."),
            pairs(&[("likes", "my job")])
        );
        assert_eq!(
            all("I live in Porto and I love it."),
            pairs(&[("location", "Porto")])
        );
        // A clause that repeats the first candidate is not a second one.
        assert_eq!(all("I love cats and have two cats.").len(), 1);
        // The message-level extractor returns every candidate.
        assert_eq!(
            extract("My name is Ana and I live in Lisbon. I hate olives.").len(),
            3
        );
    }

    #[test]
    fn habits_need_a_frequency_and_an_activity() {
        assert_extracts(&[
            ("I lift weights every weekend.", "hobby", "lifting weights"),
            (
                "I take pottery classes twice a week.",
                "hobby",
                "taking pottery classes",
            ),
            (
                "I usually bake cookies on weekends.",
                "hobby",
                "baking cookies",
            ),
            ("I like to swim in my free time.", "hobby", "swimming"),
            ("I love to go sailing every summer.", "hobby", "sailing"),
            ("When I have some free time I paint.", "hobby", "painting"),
            ("I never finished college.", "education", "college dropout"),
            (
                "I dropped out of high school at sixteen.",
                "education",
                "high school dropout",
            ),
            ("I am 42years old.", "age", "42"),
            ("I spend a lot of time gardening.", "hobby", "gardening"),
            (
                "I like to drink green tea to relax.",
                "hobby",
                "drinking green tea",
            ),
        ]);
        for sentence in [
            "I lift weights.",
            "I check my email every day.",
            "I wake up at six every morning.",
            "I can barely pay my bills every month.",
            "When is the next train",
        ] {
            assert!(
                extract_sentence(sentence).map_or(true, |c| c.rule != "habit"),
                "{sentence}"
            );
        }
        // "to" before a noun is not an infinitive.
        let c = one("I prefer tea to coffee.");
        assert_ne!(c.attribute, "hobby");
        assert_eq!(c.target, "tea to coffee");
    }

    #[test]
    fn first_person_statements() {
        let c = one("My favorite sport is ultimate frisbee.");
        assert_eq!(
            (c.attribute.as_str(), c.target.as_str()),
            ("sport", "ultimate frisbee")
        );
        let c = one("Autumn is my favorite season.");
        assert_eq!(
            (c.attribute.as_str(), c.target.as_str()),
            ("season", "Autumn")
        );
        let c = one("I'm allergic to peanuts.");
        assert_eq!(
            (c.attribute.as_str(), c.target.as_str()),
            ("allergy", "peanuts")
        );
        let c = one("I live in Porto, but I work remotely.");
        assert_eq!(c.target, "Porto");
        let c = one("I like to dance at the club.");
        assert_eq!(
            (c.attribute.as_str(), c.target.as_str()),
            ("hobby", "dancing at the club")
        );
        let c = one("I can't stand cilantro.");
        assert_eq!(
            (c.polarity, c.target.as_str()),
            (Polarity::Dislike, "cilantro")
        );
        let c = one("I don't like horror movies.");
        assert_eq!(c.polarity, Polarity::Dislike, "a negated like is a dislike");
        let c = one("I got a job working in advertising last year.");
        assert_eq!(c.target, "advertising");
        let c = one("Honestly, I work as a nurse.");
        assert_eq!(
            (c.attribute.as_str(), c.target.as_str()),
            ("profession", "nurse")
        );
    }

    #[test]
    fn not_the_users_own_preferences() {
        let cases = [
            ("What is my favorite color?", Skip::Question),
            ("Do you like jazz?", Skip::Question),
            (
                "If I were vegan, I would eat more beans.",
                Skip::Hypothetical,
            ),
            ("I wish I lived in Paris.", Skip::Hypothetical),
            ("My brother loves golf.", Skip::OtherPerson),
            ("My wife is allergic to cats.", Skip::OtherPerson),
            ("\"I love you\" is what he said.", Skip::Quoted),
            (
                "I want to be an astronaut when I grow up, said my nephew.",
                Skip::Quoted,
            ),
            ("The weather is nice today.", Skip::NoRule),
        ];
        for (text, why) in cases {
            assert_eq!(extract_sentence(text), Err(why), "{text}");
        }
    }

    #[test]
    fn hobbies_pets_and_roles() {
        assert_extracts(&[
            ("My hobby is graphic design.", "hobby", "graphic design"),
            (
                "My hobbies are knitting and chess.",
                "hobby",
                "knitting and chess",
            ),
            ("I have a turtle named Timothy.", "pet", "turtle"),
            (
                "I have a golden retriever named Ginger.",
                "pet",
                "golden retriever",
            ),
            (
                "I am also a musician on the weekends.",
                "identity",
                "musician",
            ),
            (
                "I am the lead singer in a band.",
                "identity",
                "lead singer in a band",
            ),
            (
                "I want to be a doctor when I grow up.",
                "career goal",
                "doctor",
            ),
            ("I want to learn how to draw.", "goal", "learn how to draw"),
            ("I strongly dislike theme parks.", "dislikes", "theme parks"),
            (
                "I have a strong aversion to crowded beaches.",
                "dislikes",
                "crowded beaches",
            ),
            (
                "I have a strong preference for sustainable fashion.",
                "likes",
                "sustainable fashion",
            ),
            ("I have a severe peanut allergy.", "allergy", "peanut"),
            (
                "I have a German shepherd dog.",
                "pet",
                "German shepherd dog",
            ),
            ("I have two horses.", "pet", "horses"),
            ("I have a pet cow.", "pet", "cow"),
            ("I am in the army.", "profession", "army"),
            (
                "I am employed by the postal service.",
                "job",
                "the postal service",
            ),
            ("I am in my thirties.", "age", "in my thirties"),
            (
                "I am in an open relationship.",
                "relationship status",
                "in an open relationship",
            ),
            (
                "I have a severe allergy to shellfish.",
                "allergy",
                "shellfish",
            ),
            ("I'm very sensitive to caffeine.", "allergy", "caffeine"),
            ("I work full time in a shipyard.", "job", "a shipyard"),
        ]);
        // A person with a name is not a pet.
        let c = one("I have a son named Jack.");
        assert_eq!(c.attribute, "family");
    }

    #[test]
    fn life_facts_beyond_likes() {
        assert_extracts(&[
            (
                "I was raised by my grandparents.",
                "family",
                "my grandparents",
            ),
            ("I graduated from Ohio State.", "education", "Ohio State"),
            (
                "I'm moving to Berlin in March.",
                "location",
                "Berlin in March",
            ),
            ("I want to become a nurse.", "career goal", "nurse"),
            ("I am of the Sikh faith.", "background", "Sikh"),
            ("I'm not religious.", "religion", "religious"),
            (
                "I have type 1 diabetes.",
                "health condition",
                "type 1 diabetes",
            ),
            ("I used to be a firefighter.", "past", "firefighter"),
            ("I go to the gym every morning.", "routine", "the gym"),
            ("I worked at a bakery for years.", "job", "a bakery"),
            ("I only drink green tea.", "activity", "drinking green tea"),
        ]);
        // Reported speech is someone else's plan. (A user's own "when I grow
        // up" is a stated goal, see `hobbies_pets_and_roles`.)
        assert_eq!(
            extract_sentence("I want to be a pilot when I grow up, said my son."),
            Err(Skip::Quoted)
        );
        assert_eq!(
            extract_sentence("I hope to become a doctor one day."),
            Err(Skip::Hypothetical)
        );
    }

    #[test]
    fn session_six_rules_and_clauses() {
        assert_extracts(&[
            (
                "I have a wife and three kids.",
                "family",
                "a wife and three kids",
            ),
            ("I have seven children.", "family", "seven children"),
            (
                "I am retired from banking.",
                "profession",
                "retired from banking",
            ),
            (
                "I have a computer science degree.",
                "education",
                "computer science degree",
            ),
            (
                "I have a large collection of teddy bears.",
                "hobby",
                "collecting teddy bears",
            ),
            (
                "I'm learning to play the cello.",
                "hobby",
                "learning to play the cello",
            ),
            (
                "I am going to hairdresser school.",
                "education",
                "hairdresser school",
            ),
            (
                "I restore classic cars.",
                "activity",
                "restoring classic cars",
            ),
            (
                "Hey there I am a professional singer.",
                "identity",
                "professional singer",
            ),
            // A clause after "and" gets its subject back.
            (
                "I am native american and live in oklahoma.",
                "location",
                "oklahoma",
            ),
            ("I have three guns and love hunting.", "hobby", "hunting"),
        ]);
        // The clause split does not reach other people or hypotheticals.
        assert!(extract_sentence("I came home and my brother loves golf.").is_err());
        assert_eq!(
            extract_sentence("If I had time I would cook and bake bread."),
            Err(Skip::Hypothetical)
        );
    }

    #[test]
    fn evidence_is_a_span_of_the_message() {
        let msg = "Hi there! I live in Lisbon. My sister lives in Rome. Also, I love sushi.";
        let found = extract(msg);
        assert_eq!(found.len(), 2, "{found:?}");
        for c in &found {
            assert!(msg.contains(&c.evidence));
        }
        assert_eq!(found[1].target, "sushi");
    }
}
