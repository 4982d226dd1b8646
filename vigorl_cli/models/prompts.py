r"""Every system prompt and message layout of the pipeline, in one place (reference: Gabesarch/grounded-rl).

A prompt is addressed by ``(preset, variant)``. Presets are tasks; variants are the stage-specific wording:

=================  ==============================================================================================
variant            used by
=================  ==============================================================================================
mcts               MCTS teacher: ONE ``<think>`` step (or the answer) per call (reference §1.3)
single             one set of ``<think>`` tags, then ``<answer>``: single-turn SFT, GRPO, eval (§2.1, §5.3, §6.2)
multiturn          zoom tool (``search_coordinate``) dialogs: multi-turn SFT, GRPO and eval (§2.2, §5.5, §6.4)
vanilla            the ``*_naive_grpo.jinja`` "vanilla thinking" GRPO baseline (§5.1)
answer_only        base-model / SFT-direct prompting, answer only (eval used ``--rollout_no_thinking``, §6.2)
no_grounding       issue #18 ablation, SFT/RL/eval prompt: reasoning without coordinates (§4)
no_grounding_mcts  issue #18 ablation, MCTS teacher prompt (one step per response, no coordinates)
=================  ==============================================================================================

Which texts are copied and which are ours (``SOURCES``; ``available()`` lists every pair with a note).
**verbatim** = copied character for character from the full text in the reference digest
(``vigorl-reference.md``, shared with the project); **reconstructed** = the digest only summarises the reference
text, so we wrote our own following that summary as closely as we could. Expect reconstructed prompts to steer a
released ViGoRL checkpoint slightly differently from the original text.

=============  =======  =======  =========  =======  ===========  ============  =================
preset         mcts     single   multiturn  vanilla  answer_only  no_grounding  no_grounding_mcts
=============  =======  =======  =========  =======  ===========  ============  =================
web_grounding  V        V        V          R        R            R             R
spatial        V        V        V          R        V            R             R
vstar          V        R        V          --       --           R             R
web_action     R        R        V          R        --           R             R
=============  =======  =======  =========  =======  ===========  ============  =================

V = verbatim, R = reconstructed. ``--``: the reference has no such prompt, and asking for it raises ``ValueError``.

Which text the reference used where (digest §9.1), with our decisions:

* **web_grounding**: teacher = ``mcts``; SFT, RL and eval single-turn = ``single`` (osatlas_grounded_thinking);
  multi-turn SFT, RL and eval = ``multiturn`` (osatlas_multiturn_crop).
* **spatial** (SAT-2, BLINK): teacher = ``mcts`` (sat2); SFT, RL and eval = ``single`` (sat2_grounded_thinking).
  ``multiturn`` is the generic QA tool prompt (vstar_multiturn text), which the reference's multi-turn linearizer
  would use for spatial. The paper did not use it.
* **vstar** (V*Bench): teacher = ``mcts``; multi-turn SFT, RL and eval = ``multiturn`` (vstar_multiturn).
  *Decision*: the reference ``run_vigorl.sh`` configured the web-grounding ``osatlas_multiturn_crop.jinja`` for V*
  multi-turn RL, which looks like a slip (its SFT data and its eval both use the vstar text). We use the vstar
  text in every stage. ``single`` is the linearizer's ``system_prompt_qa`` ("V* single turn not tested yet" in the
  reference; the RL script pointed at a missing ``general_qa.jinja``). We use that prompt for single-turn SFT, RL
  and eval alike.
* **web_action** (VisualWebArena): teacher = ``mcts``; SFT and RL = ``single`` (web_action_grounded_thinking).
  The reference evaluated with the external VWA harness. ``multiturn`` is again the generic QA tool prompt
  (unused by the paper).
* **baselines**: ``vanilla`` = ``*_naive_grpo.jinja`` (web_grounding, spatial, web_action only). ``answer_only`` =
  the base-model prompts of the eval scripts. The reference's SFT-direct baseline had its own answer-only prompt,
  deleted in commit a8e2c33 and not in the digest; we use the same ``answer_only`` text there too.

Newlines, quotes and the reference-compatible mode. We store every text with REAL newlines and plain quotes.
That is what the reference's SFT data contained (Python strings; ``textwrap.dedent`` changes nothing in these
texts). The other stages sent something else:

* MCTS (bash ``"..."`` strings), eval (bash) and GRPO (``.jinja`` files read raw, ``.strip()``-ed, NOT rendered)
  show the model the two characters backslash+n instead of every newline.
  ``system_prompt(..., literal_newlines=True)`` gives exactly that: every ``"\n"`` becomes ``"\\n"``, with nothing
  else touched.
* ``reference_system_prompt(preset, variant, stage)`` reproduces the exact string of one reference stage
  (``mcts``, ``sft``, ``rl``, ``eval``). It differs from the ``literal_newlines`` form in two places:
  (1) GRPO multi-turn: the jinja files also write the JSON example as ``{\"name\": \"search_coordinate\", ...}``
  with backslash-quote (bash turned these into plain quotes for eval, and Python did the same for SFT), so stage
  ``rl`` escapes ``"`` as ``\"`` in ``multiturn``;
  (2) MCTS web_action: the bash string has literal ``\n`` only in its preamble and real newlines in the
  VisualWebArena block. The block also ends in a newline. Bash runs the ```` ```click [id]``` ```` spans inside
  double quotes as command substitutions, which print nothing, so the teacher never saw the action names. Stage
  ``mcts`` reproduces all three effects on our (reconstructed) text.
* ``thought_count_line(n)`` is appended to the MCTS prompt with a REAL newline even when the prompt has literal
  ones, as in the reference (``mcts_system_prompt`` does the appending).

Message layout (pure text helpers; chat templating and tokenisation live elsewhere):

* MCTS teacher call = system prompt (+ ``thought_count_line``), then ONE user message: image, then
  ``mcts_user_text(question, previous_thoughts)``. If forced, a second user message ``FORCE_FINAL_TEXT`` follows.
* Multi-turn assistant turn = ``think_text(reasoning) + tool_call_text(x, y)``. The observation user turn is
  ``observation_text(...)`` around the crop image. The closing turn is ``FINAL_THINK_TEXT + answer_text(answer)``.
  ``FORCED_ANSWER_PREFIX`` (= ``FINAL_THINK_TEXT + "<answer>"``) is the reference's forced ending, used by RL
  (with the 4th crop) and eval (at max depth). ``PAPER_FORCED_TERMINATION_TEXT`` is the paper's alternative
  (A5.3, not in the code).
* Single-turn SFT chain = ``chain_text(reasoning, answer)``. Corrected chains join the wrong and the right
  reasoning with ``BACKTRACK_TEXT`` (``corrected_reasoning``).
"""

from __future__ import annotations

import json
import operator
import re

PRESETS = ("web_grounding", "spatial", "vstar", "web_action")
VARIANTS = ("mcts", "single", "multiturn", "vanilla", "answer_only", "no_grounding", "no_grounding_mcts")
STAGES = ("mcts", "sft", "rl", "eval")  # reference stages known to reference_system_prompt()

# --------------------------------------------------------------------------------------------------------------
# Verbatim texts (reference digest §1.3, §2.1, §2.2, §6.2). Real newlines; see the module docstring for the
# literal-backslash-n forms the reference's bash/jinja stages produced.
# --------------------------------------------------------------------------------------------------------------

_MCTS_WEB_GROUNDING = (
    "You are a helpful assistant tasked with grounding an element on a web page. You should systematically reason "
    "through the problem step by step by checking and verifying relevant webpage regions, while grounding "
    "reasoning steps to specific (x, y) points in the image:\n"
    "Each reasoning step must be enclosed within '<think>' tags and reference exactly one specific coordinate (x, "
    "y):\n"
    "<think>\n"
    "{Single reasoning step with a grounded point} (x, y).\n"
    "</think>\n"
    "When ready to provide the final answer, enclose it within '<answer>' tags:\n"
    "<answer> (xf, yf) </answer>\n"
    "Your task is to help the user identify precise (x,y) coordinates of a described area/element/object based on "
    "a description.\n"
    "- Generate ONLY ONE reasoning step OR the final answer per response.\n"
    "- Regions are distinct, non-overlapping areas (e.g., quadrants like top-left, elements like tree/button, "
    "zones like background/foreground).\n"
    "- Each step should describe the region then evaluate it for its relevance to the task and to previous steps.\n"
    "- Never repeat coordinates from previous steps.\n"
    "- Begin by exploring diverse regions, even if they seem less likely, to ensure comprehensive coverage before "
    "narrowing down.\n"
    "- Prioritize broad coverage of diverse candidates before deciding.\n"
    "- Aim for accurate, representative points in the described area/element/object.\n"
    "- If unclear, infer based on likely context or purpose.\n"
    "- Verify each step by examining multiple possible solutions before selecting a final coordinate.\n"
    "- Format points as (x, y)"
)

_MCTS_SPATIAL = (
    "You are a helpful assistant tasked with answering a question about an image. You should systematically reason "
    "through the problem step by step by checking and verifying relevant image regions, while grounding reasoning "
    "steps to specific (x, y) points in the image:\n"
    "Each reasoning step must be enclosed within '<think>' tags and reference exactly one specific coordinate (x, "
    "y):\n"
    "<think>\n"
    "{Single reasoning step with a grounded point} (x, y).\n"
    "</think>\n"
    "When ready to provide the final answer, enclose it within '<answer>' tags:\n"
    "<answer> {text of final answer} </answer>\n"
    "Your task is to help the user answer the question that may involve small details in the image.\n"
    "- Generate ONLY ONE reasoning step OR the final answer per response.\n"
    "- Regions are distinct, non-overlapping areas (e.g., quadrants like top-left, small elements or objects, "
    "zones like background/foreground).\n"
    "- Each step should describe the region then evaluate it for its relevance to the task and to previous steps.\n"
    "- Never repeat coordinates from previous steps.\n"
    "- Begin by exploring diverse regions, even if they seem less likely, to ensure comprehensive coverage before "
    "narrowing down.\n"
    "- Prioritize broad coverage of diverse candidates before deciding.\n"
    "- Aim for accurate, representative points in the described area/element/object.\n"
    "- If unclear, infer based on likely context or purpose.\n"
    "- Your final answer should be the text of the choice you think is most correct.\n"
    "- Verify each step by examining multiple possible solutions before selecting a final coordinate.\n"
    "- Format points as (x, y)"
)

_MCTS_VSTAR = (
    "You are a helpful assistant tasked with answering a question about an image. You should systematically reason "
    "through the problem step by step by checking and verifying relevant image regions, while grounding reasoning "
    "steps to specific (x, y) points in the image:\n"
    "Each reasoning step must be enclosed within '<think>' tags and reference exactly one specific coordinate (x, "
    "y):\n"
    "<think>\n"
    "{Single reasoning step with a grounded point} (x, y).\n"
    "</think>\n"
    "When ready to provide the final answer, enclose it within '<answer>' tags:\n"
    "<answer> {final answer} </answer>\n"
    "Your task is to help the user answer the question that may involve small details in the image.\n"
    "- Generate ONLY ONE reasoning step OR the final answer per response.\n"
    "- Regions are distinct, non-overlapping areas (e.g., quadrants like top-left, small elements or objects, "
    "zones like background/foreground).\n"
    "- Each step should describe the region then evaluate it for its relevance to the task and to previous steps.\n"
    "- Never repeat coordinates from previous steps.\n"
    "- Begin by exploring diverse regions, even if they seem less likely, to ensure comprehensive coverage before "
    "narrowing down.\n"
    "- Prioritize broad coverage of diverse candidates before deciding.\n"
    "- Aim for accurate, representative points in the described area/element/object.\n"
    "- If unclear, infer based on likely context or purpose.\n"
    "- Your final answer should be the choice you think is most correct.\n"
    "- Verify each step by examining multiple possible solutions before selecting a final coordinate.\n"
    "- Format points as (x, y)"
)

_SINGLE_WEB_GROUNDING = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
    "Assistant systematically reasons through the problem step by step, verifying each step and grounding every "
    "step to a specific point in the image.\n"
    "\n"
    "All reasoning processes must be enclosed within a single set of '<think>' tags, with each reasoning step "
    "explicitly referencing a coordinate:\n"
    "\n"
    "<think>\n"
    "[Reasoning text with grounded points inline] (x1, y1). [Further reasoning] (x2, y2), [Final refinement] (x3, "
    "y3).\n"
    "</think>\n"
    "\n"
    "The final answer should be enclosed in '<answer>' tags in the format:\n"
    "<answer> (xf, yf) </answer>\n"
    "\n"
    "Your task is to help the user identify the precise coordinates (x, y) of a specific area/element/object on "
    "the screen based on a description.\n"
    "- Aim to point to the center or a representative point within the described area/element/object as accurately "
    "as possible.\n"
    "- If the description is unclear or ambiguous, infer the most relevant area or element based on its likely "
    "context or purpose.\n"
    "- The final output should be the single most precise coordinate for the requested element.\n"
    "- The Assistant should verify each step and check multiple possible solutions before selecting the final "
    "answer."
)

_SINGLE_SPATIAL = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
    "Assistant systematically reasons through the problem step by step by checking and verifying possible "
    "solutions and image regions, while grounding reasoning steps to specific objects and their relationships in "
    "the image using (x,y) coordinates. There may be one image or two images concatenated together, in which case "
    "the Assistant must compare the spatial relationships between the two images.\n"
    "\n"
    "All reasoning processes must be enclosed within a single set of '<think>' tags, and reasoning steps must "
    "include specific reference coordinates:\n"
    "\n"
    "For example, <think>\n"
    "{Reasoning text}. {Further reasoning text} {more reasoning} \n"
    "</think>\n"
    "\n"
    "The final answer should be enclosed in '<answer>' tags in the format:\n"
    "<answer> {text of selected answer choice} </answer>\n"
    "\n"
    "The Assistant must help the user identify the correct answer choice from the options provided.\n"
    "-Your answer should be the **exact text** of the selected answer option, without additional explanations or "
    "reasoning or the option text. For example, if the answer is A. right , your response should just be "
    "<answer>right</answer> (not <answer>A. right</answer>).\n"
    "-If the correct answer is unclear, select the most relevant option based on the spatial relationships and "
    "dynamics within the image.\n"
    "- The Assistant should verify each step and check multiple possible solutions before selecting the final "
    "answer."
)

_MULTITURN_WEB_GROUNDING = (
    "You are an assistant tasked with identifying precise (x,y) coordinates of a described element in an image.\n"
    "Your task involves multiple turns of reasoning, each with EXACTLY one <think> step and one action:\n"
    "- At each turn, first clearly reason about ONE area or element in the image enclosed in <think> </think> tags.\n"
    "- After reasoning, either:\n"
    "  a) Output a search action formatted precisely as:\n"
    "     <tool_call>\n"
    '     {"name": "search_coordinate", "arguments": {"coordinate": [x, y]}}\n'
    "     </tool_call>\n"
    "  b) If confident you've found the correct location, output your final answer enclosed in <answer> (x, y) "
    "</answer> tags.\n"
    "- Only answer if you are confident about the answer. If you are not confident, output a search action. You "
    "should not always end after one turn.\n"
    "- You should not repeat the same coordinates in a tool call more than once. Coordinates must be unique across "
    "tool calls, including values that are the same or nearly identical (e.g., differing by only a few pixels)."
)

_MULTITURN_QA = (
    "You are a helpful assistant tasked with answering a question about an image. You should systematically reason "
    "through the problem step by step by checking and verifying relevant image regions, while grounding reasoning "
    "steps to specific (x, y) points in the image:\n"
    "- At each turn, first clearly reason about ONE area or element in the image enclosed in <think> </think> tags.\n"
    "- After reasoning, either:\n"
    "  a) Zoom-in on a specific region to see it better by outputting a search action formatted precisely as:\n"
    "     <tool_call>\n"
    '     {"name": "search_coordinate", "arguments": {"coordinate": [x, y]}}\n'
    "     </tool_call>\n"
    "  b) If confident you've found the correct location, output your final answer enclosed in <answer> {final "
    "answer} </answer> tags.\n"
    "- Only answer if you are confident about the answer. If you are not confident, output a search action. You "
    "should not always end after one turn.\n"
    "- You should not repeat the same coordinates in a tool call more than once. Coordinates must be unique across "
    "tool calls, including values that are the same or nearly identical (e.g., differing by only a few pixels).\n"
    "- If unclear, infer based on likely context or purpose.\n"
    "- Verify each step by examining multiple possible solutions before selecting a final answer."
)

# eval_spatial.sh SYSTEM_PROMPT_BASE_MODEL (digest §6.2), run with --rollout_no_thinking.
_ANSWER_ONLY_SPATIAL = (
    "You are a helpful assistant. With the image as context, pick the correct answer choice to answer the provided "
    "question. Only return the text of the correct answer choice."
)

# --------------------------------------------------------------------------------------------------------------
# Reconstructed texts: the digest only summarises these (quoted fragments are kept word for word). Ours.
# --------------------------------------------------------------------------------------------------------------

# web_action MCTS teacher (digest §1.3): the grounded one-step preamble of the other MCTS prompts, then the
# VisualWebArena Inputs / Action Space / Guidelines block, which the reference wrote with REAL newlines inside an
# otherwise literal-\n bash string (kept as two pieces so reference_system_prompt can reproduce that).
_MCTS_WEB_ACTION_PREAMBLE = (
    "You are a helpful Assistant tasked with navigating a web browser. You should systematically reason through "
    "the problem step by step by checking and verifying relevant webpage regions and possible actions, while "
    "grounding reasoning steps to specific (x, y) points in the image:\n"
    "Each reasoning step must be enclosed within '<think>' tags and reference exactly one specific coordinate (x, "
    "y):\n"
    "<think>\n"
    "{Single reasoning step with a grounded point} (x, y).\n"
    "</think>\n"
    "When ready to provide the final answer, enclose it within '<answer>' tags:\n"
    "<answer> {action} </answer>\n"
    "Your task is to choose the single action that makes the most progress towards the user's objective.\n"
    "- Generate ONLY ONE reasoning step OR the final action per response.\n"
    "- Each step should describe a webpage region, then evaluate its relevance to the objective and to previous "
    "steps.\n"
    "- Never repeat coordinates from previous steps.\n"
    "- Explore diverse webpage regions before deciding which action to take.\n"
    "- Verify each step by examining multiple possible actions before selecting the final one.\n"
    "- Format points as (x, y)"
)

_VWA_INPUTS_AND_ACTIONS = (
    "**Inputs**\n"
    "You will be given:\n"
    "1. OBJECTIVE: the task you are trying to complete.\n"
    "2. The web page screenshot: the current page, where every interactable element carries a unique numerical id "
    "drawn in the same color as its bounding box.\n"
    "3. PREVIOUS ACTIONS: the actions performed so far; for earlier pages the text of the element is given instead "
    "of its id.\n"
    "\n"
    "**Action Space**\n"
    "You can issue the following actions:\n"
    "1. ```click [id]```: click the element with this id.\n"
    "2. ```type [id] [content]```: type the content into the field with this id; pressing Enter afterwards is "
    "simulated.\n"
    "3. ```scroll [down]```: scroll the page down.\n"
    "4. ```go_back```: return to the previously viewed page.\n"
    "5. ```stop [answer]```: finish the task; put the answer in the brackets if the objective asks for text, "
    "otherwise leave them empty.\n"
)

_VWA_GUIDELINES_GROUNDED = (
    "**Guidelines**\n"
    "1. Output exactly one action as the final answer, never several.\n"
    "2. Write the final action in the correct format, for example '<answer> click [1234] </answer>'.\n"
    "3. Issue stop [answer] once the objective is achieved, and generate nothing after it.\n"
    "4. Refer to image regions as '(x, y)', the center coordinates of the region."
)

_MCTS_WEB_ACTION_BLOCK = (
    _VWA_INPUTS_AND_ACTIONS
    + "\n"
    + _VWA_GUIDELINES_GROUNDED
    + "\n"
    + "5. You should output atleast 3 reasoning steps before issuing the final action."  # digest §1.3 (its no. 6)
)

_MCTS_WEB_ACTION = _MCTS_WEB_ACTION_PREAMBLE + "\n\n" + _MCTS_WEB_ACTION_BLOCK

# web_action SFT/RL single-turn (web_action_grounded_thinking; digest §2.1 names it only).
_SINGLE_WEB_ACTION = (
    "A conversation between User and Assistant. The User gives a web-navigation objective, and the Assistant, "
    "acting as a web browsing agent, chooses the action that makes the most progress towards it. The Assistant "
    "systematically reasons through the problem step by step by checking and verifying possible actions and "
    "webpage regions, grounding every step to a specific point in the screenshot.\n"
    "\n"
    "All reasoning processes must be enclosed within a single set of '<think>' tags, with each reasoning step "
    "explicitly referencing a coordinate:\n"
    "\n"
    "<think>\n"
    "[Reasoning text with grounded points inline] (x1, y1). [Further reasoning] (x2, y2), [Final check] (x3, y3).\n"
    "</think>\n"
    "\n"
    "The final action should be enclosed in '<answer>' tags in the format:\n"
    "<answer> {action} </answer>\n"
    "\n"
    "- Never repeat coordinates from previous steps.\n"
    "- Look at diverse webpage regions before deciding which action to take.\n"
    "\n"
    + _VWA_INPUTS_AND_ACTIONS
    + "\n"
    + _VWA_GUIDELINES_GROUNDED
)

# vstar single-turn: the linearizer's system_prompt_qa (digest §2.1 quotes its opening and two instructions).
_SINGLE_VSTAR = (
    "You are an assistant answering a visual question by reasoning through image regions. Examine and verify the "
    "relevant regions of the image step by step, grounding each reasoning step to a specific (x, y) point.\n"
    "\n"
    "All reasoning must be enclosed within a single set of '<think>' tags, and every step must reference an "
    "absolute (x, y) coordinate, followed by a description and evaluation of that region:\n"
    "\n"
    "<think>\n"
    "[Reasoning text with grounded points inline] (x1, y1). [Further reasoning] (x2, y2), [Final refinement] (x3, "
    "y3).\n"
    "</think>\n"
    "\n"
    "When confident, give the final answer enclosed in '<answer>' tags:\n"
    "<answer> {final answer} </answer>\n"
    "\n"
    "Instructions:\n"
    "- Always begin a reasoning step with an (x, y) coordinate.\n"
    "- Coordinates must be absolute image points formatted as integers: (x, y).\n"
    "- Regions are distinct parts of the image: quadrants (e.g., top-left), individual objects, or zones such as "
    "background/foreground.\n"
    "- Explore diverse regions early, even less likely ones, before narrowing down.\n"
    "- Evaluate each region's relevance to the question and its relation to previous steps.\n"
    "- Choose accurate, representative coordinates within each region."
)

# Vanilla-thinking GRPO baseline (*_naive_grpo.jinja; digest §5.1/§6.2 name them only): the DeepSeek-R1 template
# plus the task rules, with no grounding requirement.
_R1_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
    "Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>."
)

_VANILLA_RULES = (
    "\n"
    "\n"
    "Rules:\n"
    "- Always write the <think> section first and reason step by step in it.\n"
    "- Then give the final answer inside the <answer> section. Both sections are required in every response.\n"
)

_VANILLA_WEB_GROUNDING = (
    _R1_TEMPLATE
    + _VANILLA_RULES
    + "- The <answer> must contain only the point, as (x, y).\n"
    "- Your task is to identify the precise coordinates (x, y) of a specific area/element/object on the screen "
    "based on a description.\n"
    "- Point to the center or a representative point within the described area/element/object.\n"
    "- If the description is unclear or ambiguous, infer the most likely element from its context or purpose."
)

_VANILLA_SPATIAL = (
    _R1_TEMPLATE
    + _VANILLA_RULES
    + "- The <answer> must contain only the exact text of the selected answer choice.\n"
    "- Your task is to identify the correct answer choice from the options provided.\n"
    "- If the question is unclear or ambiguous, choose the most relevant option."
)

_VANILLA_WEB_ACTION = (
    "You are a helpful Assistant tasked with navigating a web browser. Choose the single action that best "
    "advances the user's objective. First think about the reasoning process in the mind, then give the action as "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>.\n"
    "\n"
    + _VWA_INPUTS_AND_ACTIONS
    + "\n"
    "**Guidelines**\n"
    "1. Write the reasoning and the final action in the correct format, for example "
    "'<think> reasoning process here </think><answer> click [1234] </answer>'.\n"
    "2. Issue stop [answer] once the objective is achieved, and generate nothing after it.\n"
    "3. Output exactly one action as the final answer, never several."
)

# eval_web_grounding.sh SYSTEM_PROMPT_BASE_MODEL: the digest quotes the first and last sentences only.
_ANSWER_ONLY_WEB_GROUNDING = (
    "Identify the precise coordinates (x, y) of a specific area/element/object on the screen based on a "
    "description.\n"
    "\n"
    "- Point to the center or a representative point within the described area/element/object.\n"
    "- If the description is unclear or ambiguous, infer the most likely element from its context or purpose.\n"
    "- Your answer should be a single string (x, y) corresponding to the point of interest."
)

# Issue #18 (no explicit grounding ablation, paper §5.2). The maintainer's prompts are task-agnostic, so one text
# serves every preset. The digest keeps only the format and the "Do NOT refer ..." sentence, which is verbatim here.
_NO_GROUNDING_MCTS = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant answers with either a "
    "single reasoning step or the final answer. The Assistant reasons through the problem step by step, weighing "
    "possible interpretations and solutions.\n"
    "\n"
    "Each reasoning step must be enclosed within '<think>' tags:\n"
    "\n"
    "<think>\n"
    "{Single reasoning step.}\n"
    "</think>\n"
    "\n"
    "When the reasoning is complete, give the final answer enclosed in '<answer>' tags:\n"
    "\n"
    "<answer> {final answer} </answer>\n"
    "\n"
    "Your task is to help the user solve the question they pose.\n"
    "- Generate ONLY ONE reasoning step OR the final answer per response.\n"
    "- Do NOT refer to image region coordinates or any explicit spatial grounding.\n"
    "- The final answer should follow from the previous reasoning steps."
)

_NO_GROUNDING = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
    "Assistant reasons through the problem step by step, weighing possible interpretations and solutions.\n"
    "\n"
    "All reasoning processes must be enclosed within a single set of '<think>' tags:\n"
    "\n"
    "<think>\n"
    "{Reasoning text}. {Further reasoning text} {more reasoning}\n"
    "</think>\n"
    "\n"
    "The final answer should be enclosed in '<answer>' tags in the format:\n"
    "<answer> {final answer} </answer>\n"
    "\n"
    "- Do NOT refer to image region coordinates or any explicit spatial grounding.\n"
    "- The final answer should follow from the reasoning."
)

# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------

_V, _R = "verbatim", "reconstructed"
_ISSUE18 = "issue #18 ablation (task-agnostic; the paper ran it on spatial)"

# (preset, variant) -> (text, verbatim|reconstructed, where it comes from)
_REGISTRY: dict[tuple[str, str], tuple[str, str, str]] = {
    ("web_grounding", "mcts"): (_MCTS_WEB_GROUNDING, _V, "run_mcts_qwen72b.sh web_grounding, paper Listing A1 (§1.3)"),
    ("web_grounding", "single"): (_SINGLE_WEB_GROUNDING, _V, "osatlas_grounded_thinking (§2.1)"),
    ("web_grounding", "multiturn"): (_MULTITURN_WEB_GROUNDING, _V, "osatlas_multiturn_crop (§2.2)"),
    ("web_grounding", "vanilla"): (_VANILLA_WEB_GROUNDING, _R, "osatlas_naive_grpo.jinja (§5.1)"),
    ("web_grounding", "answer_only"): (_ANSWER_ONLY_WEB_GROUNDING, _R, "eval_web_grounding.sh base model (§6.3)"),
    ("spatial", "mcts"): (_MCTS_SPATIAL, _V, "run_mcts_qwen72b.sh sat2 (§1.3)"),
    ("spatial", "single"): (_SINGLE_SPATIAL, _V, "sat2_grounded_thinking (§2.1, §6.2)"),
    ("spatial", "multiturn"): (_MULTITURN_QA, _V, "vstar_multiturn text (linearizer choice; unused, §2.2)"),
    ("spatial", "vanilla"): (_VANILLA_SPATIAL, _R, "sat2_naive_grpo.jinja (§5.1, §6.2)"),
    ("spatial", "answer_only"): (_ANSWER_ONLY_SPATIAL, _V, "eval_spatial.sh base model (§6.2)"),
    ("vstar", "mcts"): (_MCTS_VSTAR, _V, "run_mcts_qwen72b.sh vstar (§1.3)"),
    ("vstar", "single"): (_SINGLE_VSTAR, _R, "linearizer system_prompt_qa, 'not tested' in the reference (§2.1)"),
    ("vstar", "multiturn"): (_MULTITURN_QA, _V, "vstar_multiturn (§2.2, §6.4); also for RL, see decisions"),
    ("web_action", "mcts"): (_MCTS_WEB_ACTION, _R, "run_mcts_qwen72b.sh web_action (§1.3)"),
    ("web_action", "single"): (_SINGLE_WEB_ACTION, _R, "web_action_grounded_thinking (§2.1)"),
    ("web_action", "multiturn"): (_MULTITURN_QA, _V, "vstar_multiturn text (linearizer choice; unused, §2.2)"),
    ("web_action", "vanilla"): (_VANILLA_WEB_ACTION, _R, "web_action_naive_grpo.jinja (§5.1)"),
}
for _preset in PRESETS:
    _REGISTRY[(_preset, "no_grounding")] = (_NO_GROUNDING, _R, _ISSUE18 + ", SFT/RL prompt (§4)")
    _REGISTRY[(_preset, "no_grounding_mcts")] = (_NO_GROUNDING_MCTS, _R, _ISSUE18 + ", MCTS prompt (§4)")

#: ``(preset, variant) -> "verbatim" | "reconstructed"`` for every available pair.
SOURCES: dict[tuple[str, str], str] = {key: kind for key, (_, kind, _) in _REGISTRY.items()}


def available() -> list[tuple[str, str, str]]:
    """Every available ``(preset, variant, source_note)``, in PRESETS × VARIANTS order.

    The note starts with ``verbatim`` or ``reconstructed`` and names the reference text (digest section)."""
    return [(p, v, f"{_REGISTRY[p, v][1]}: {_REGISTRY[p, v][2]}")
            for p in PRESETS for v in VARIANTS if (p, v) in _REGISTRY]


def _lookup(preset: str, variant: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"unknown prompt preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown prompt variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    if (preset, variant) not in _REGISTRY:
        valid = [v for v in VARIANTS if (preset, v) in _REGISTRY]
        raise ValueError(f"the reference has no {variant!r} prompt for preset {preset!r}; "
                         f"valid variants for {preset!r}: {', '.join(valid)}")
    return _REGISTRY[preset, variant][0]


def to_literal_newlines(text: str) -> str:
    """Replace every newline with the two characters backslash + n (how bash/jinja-held prompts reached the model)."""
    return text.replace("\n", "\\n")


def system_prompt(preset: str, variant: str, literal_newlines: bool = False) -> str:
    """The system prompt text for ``preset`` (task) and ``variant`` (stage wording).

    ``literal_newlines=True`` gives the reference-compatible RL/eval/MCTS form: each newline becomes backslash + n
    and nothing else changes. For the byte-exact string of one reference stage, including the two exceptions in the
    module docstring, use :func:`reference_system_prompt`. Raises ``ValueError`` naming the valid choices."""
    text = _lookup(preset, variant)
    return to_literal_newlines(text) if literal_newlines else text


def reference_system_prompt(preset: str, variant: str, stage: str) -> str:
    """The system prompt exactly as the reference sent it to the model at ``stage``.

    The stages are ``mcts`` (bash), ``sft`` (Python strings, real newlines), ``rl`` (raw jinja, ``.strip()``-ed)
    and ``eval`` (bash). Reconstructed texts get the same transformations, so the result is only as close to the
    reference as the text itself. The MCTS "at least N thoughts" line is not included; see
    :func:`mcts_system_prompt`."""
    text = _lookup(preset, variant)
    if stage not in STAGES:
        raise ValueError(f"unknown reference stage {stage!r}; valid stages: {', '.join(STAGES)}")
    if stage == "sft":
        return text
    if stage == "mcts" and (preset, variant) == ("web_action", "mcts"):
        # bash "...": literal \n in the preamble, real newlines in the VWA block plus a trailing one; the
        # ```cmd``` spans are command substitutions that print nothing.
        block = re.sub(r"`[^`]*`", "", _MCTS_WEB_ACTION_BLOCK)
        return to_literal_newlines(_MCTS_WEB_ACTION_PREAMBLE) + "\n\n" + block + "\n"
    text = to_literal_newlines(text)
    if stage == "rl" and variant == "multiturn":
        text = text.replace('"', '\\"')  # the jinja files hold {\"name\": \"search_coordinate\", ...}
    return text


# --------------------------------------------------------------------------------------------------------------
# MCTS teacher messages (reference §1.3)
# --------------------------------------------------------------------------------------------------------------

#: inclusive range of N in thought_count_line (reference: np.random.randint(3, 8), drawn once per sample)
THOUGHT_COUNT_RANGE = (3, 7)

#: the user message added when the teacher must answer now (depth >= max_depth, or last rollout step)
FORCE_FINAL_TEXT = (
    "\nYour turn! Max thoughts reached. You should now provide the final answer in the format <answer> ... </answer>"
)


def thought_count_line(n: int) -> str:
    """``--add_thought_number_system_prompt``: appended to the MCTS system prompt (leading real newline)."""
    return f"\n- There should be at least {n} thoughts before providing the final answer."


def mcts_system_prompt(preset: str, n_thoughts: int | None = None, literal_newlines: bool = False,
                       variant: str = "mcts") -> str:
    """The teacher's system prompt, optionally with the "at least N thoughts" line.

    ``literal_newlines=True`` reproduces the reference's MCTS string exactly
    (``reference_system_prompt(preset, variant, "mcts")``). The appended line keeps its real newline, as in the
    reference."""
    if literal_newlines:
        text = reference_system_prompt(preset, variant, "mcts")
    else:
        text = system_prompt(preset, variant)
    return text + thought_count_line(n_thoughts) if n_thoughts is not None else text


def _strip_think_tags(text: str) -> str:
    return text.replace("<think>", "").replace("</think>", "").strip()


def mcts_user_text(question: str, previous_thoughts: list[str]) -> str:
    """Text of the teacher's single user message (the image goes before it as its own content part).

    The question loses its ``<image>`` placeholder and is stripped. Each previous thought k (1-based) follows as
    ``"\\n\\nPrevious thought k: <thought without <think>/</think>, stripped>"``."""
    text = question.replace("<image>", "").strip()
    for k, thought in enumerate(previous_thoughts, start=1):
        text += f"\n\nPrevious thought {k}: {_strip_think_tags(thought)}"
    return text


# --------------------------------------------------------------------------------------------------------------
# Single-turn chains (reference §2.1)
# --------------------------------------------------------------------------------------------------------------

#: joins a wrong rollout's reasoning to a correct one in a "corrected chain"
BACKTRACK_TEXT = "Wait, this seems off. Let's try something else."


def corrected_reasoning(wrong: str, correct: str) -> str:
    """``wrong + "\\n" + BACKTRACK_TEXT + "\\n" + correct`` (both already tag-free, space-joined thoughts)."""
    return f"{wrong}\n{BACKTRACK_TEXT}\n{correct}"


def chain_text(reasoning: str, answer: str) -> str:
    """One SFT assistant message: ``"<think>\\n{reasoning}\\n</think>\\n<answer> {answer} </answer>"``."""
    return f"<think>\n{reasoning}\n</think>\n<answer> {answer} </answer>"


# --------------------------------------------------------------------------------------------------------------
# Multi-turn tool dialogs (reference §2.2, §5.5, §6.4)
# --------------------------------------------------------------------------------------------------------------

TOOL_NAME = "search_coordinate"  # the paper calls it "crop"

#: the closing assistant turn's think block in multi-turn SFT data (and the forced ending, below)
FINAL_THINK_TEXT = "<think> Based on all the information I've gathered, I'll now provide my final answer. </think>\n"
#: reference forced ending: appended after the 4th crop in RL, and as a continued assistant prefix in eval
FORCED_ANSWER_PREFIX = FINAL_THINK_TEXT + "<answer>"
#: the paper's description of forced termination (A5.3); the code uses FORCED_ANSWER_PREFIX instead
PAPER_FORCED_TERMINATION_TEXT = "<think> Please provide your response now </think>"

_OBSERVATION_HEAD = "<observation>\nHere is the crop of the image centered on the coordinate"
_OBSERVATION_DOT = ", with a red dot at the coordinate location"


def think_text(reasoning: str) -> str:
    """A multi-turn assistant think block: ``"<think> {reasoning} </think>\\n"``."""
    return f"<think> {reasoning} </think>\n"


def tool_call_text(x: int, y: int) -> str:
    """``<tool_call>\\n{"name": "search_coordinate", "arguments": {"coordinate": [x, y]}}\\n</tool_call>``.

    ``x``/``y`` must be integers (absolute pixels of the model-input image); round or truncate before calling."""
    call = {"name": TOOL_NAME, "arguments": {"coordinate": [operator.index(x), operator.index(y)]}}
    return "<tool_call>\n" + json.dumps(call) + "\n</tool_call>"


def answer_text(answer: str | tuple[int, int]) -> str:
    """``"<answer> (x, y) </answer>"`` for a point, ``"<answer> {text} </answer>"`` otherwise."""
    if isinstance(answer, tuple):
        x, y = answer
        return f"<answer> ({x}, {y}) </answer>"
    return f"<answer> {answer} </answer>"


def observation_text(draw_dot: bool, compat_eval: bool = False, compat_rl: bool = False) -> tuple[str, str]:
    """``(before_image, after_image)``: the text of the observation user turn, to either side of the crop image.

    * default (multi-turn SFT data, and ours everywhere):
      ``"<observation>\\nHere is the crop of the image centered on the coordinate[, with a red dot at the coordinate
      location]:\\n"`` | image | ``"\\n</observation>"``
    * ``compat_rl``: the reference GRPO rollout's form. It is the same, except that no newline follows the image:
      ``...:\\n`` | image | ``"</observation>"``
    * ``compat_eval``: the reference eval wrapper's form, which never mentions the dot (``draw_dot`` is ignored) and
      puts no newline before the image: ``"<observation>\\nHere is the crop of the image centered on the
      coordinate:"`` | image | ``"\\n</observation>"``

    The reference RL also wraps the turn in raw chat tokens (``"\\n<|im_start|>user\\n" ... "<|im_end|>\\n
    <|im_start|>assistant\\n"``). That is the chat template's job, not this function's."""
    if compat_eval and compat_rl:
        raise ValueError("observation_text: choose at most one of compat_eval and compat_rl")
    if compat_eval:
        return _OBSERVATION_HEAD + ":", "\n</observation>"
    before = _OBSERVATION_HEAD + (_OBSERVATION_DOT if draw_dot else "") + ":\n"
    return before, ("</observation>" if compat_rl else "\n</observation>")


def observation_content(draw_dot: bool, image_token: str = "<image>", compat_eval: bool = False,
                        compat_rl: bool = False) -> str:
    """The observation turn as one string with ``image_token`` where the crop goes (sharegpt SFT style)."""
    before, after = observation_text(draw_dot, compat_eval=compat_eval, compat_rl=compat_rl)
    return before + image_token + after
