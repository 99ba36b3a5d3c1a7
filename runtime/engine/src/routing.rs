//! The `route` stage as the queue runs it, sans-IO, shared by both hosts (the daemon's
//! queue manager and `mailc test`'s `route:` expectations), so a transcript shows how the
//! daemon routes.
//!
//! Two things happen beyond one evaluation of the stage:
//! - **A rewritten recipient is routed anew** (R36): `rewrite recipient virtual` turns
//!   `info@virtual.example` into `alice@example.com`, and the rest of the route stage ran
//!   with the old address, so its decision is dropped and the stage runs again for the new
//!   address, as Postfix applies `virtual_alias_maps` before it routes. A rewrite to the same
//!   address ends the rewriting (a catch-all that maps onto itself); an address seen before,
//!   or more than [`MAX_REWRITES`] rewrites, is a loop: the recipient is deferred with
//!   `451 4.3.0` so an administrator can fix the table without losing mail, as Postfix does.
//! - **soft_bounce** (R40): a `reject` of the stage (the error transport) becomes the
//!   matching 4xy tempfail, so the recipient is deferred, not bounced.

use mailpolicy_lang::ir::{Program, Stage};

use crate::eval::{self, Answer, Effect, Facts, Outcome, Request, Run, StageVerdict, State, Step};
use crate::smtp::Reply;

/// Rewrites of one recipient before it counts as a loop (Postfix's
/// `virtual_alias_recursion_limit` is 1000; a real table needs two or three).
pub const MAX_REWRITES: usize = 20;

/// One recipient's route: [`RouteRun::step`] until [`Step::Done`], answering each
/// [`Step::Need`] with [`RouteRun::answer`]. The verdict's effects are those of every
/// round, in order, without repeats; its last `RewriteRecipient` is the address to deliver.
pub struct RouteRun {
    run: Run,
    facts: Facts,
    state: State,
    initial: State,
    seen: Vec<String>,
    effects: Vec<Effect>,
    trace: Vec<eval::Trace>,
    soft_bounce: bool,
}

impl RouteRun {
    /// `facts` and `state` as the host builds them for the route stage of this recipient.
    pub fn new(prog: &Program, facts: Facts, state: State) -> RouteRun {
        let address = facts.recipient.as_ref().map(|r| r.address.to_ascii_lowercase()).unwrap_or_default();
        RouteRun {
            run: Run::new(prog, Stage::Route),
            facts,
            initial: state.clone(),
            state,
            seen: vec![address],
            effects: Vec::new(),
            trace: Vec::new(),
            soft_bounce: prog.server.soft_bounce,
        }
    }

    /// The facts of the current round (the recipient is the rewritten one from round 2 on).
    pub fn facts(&self) -> &Facts {
        &self.facts
    }

    pub fn answer(&mut self, request: Request, answer: Answer) {
        self.run.answer(request, answer);
    }

    pub fn step(&mut self, prog: &Program) -> Step {
        loop {
            let v = match self.run.step(prog, &self.facts, &mut self.state) {
                Step::Need(r) => return Step::Need(r),
                Step::Done(v) => v,
            };
            let current = self.facts.recipient.as_ref().map(|r| r.address.clone()).unwrap_or_default();
            let rewritten = v.effects.iter().rev().find_map(|e| match e {
                Effect::RewriteRecipient(a) => Some(a.clone()),
                _ => None,
            });
            let Some(next) = rewritten.filter(|a| !a.eq_ignore_ascii_case(&current)) else {
                return Step::Done(self.finish(v));
            };
            self.merge(v.effects, v.trace);
            let key = next.to_ascii_lowercase();
            if self.seen.contains(&key) || self.seen.len() > MAX_REWRITES {
                let reply = Reply::new(451, (4, 3, 0), format!("recipient rewriting loops at <{next}>"));
                let v = StageVerdict {
                    outcome: Outcome::Tempfail(reply),
                    decided_by: None,
                    effects: Vec::new(),
                    trace: Vec::new(),
                };
                return Step::Done(self.finish(v));
            }
            self.seen.push(key);
            if let Some(r) = self.facts.recipient.as_mut() {
                r.address = next;
                r.routing = false;
            }
            self.state = self.initial.clone();
            self.run = Run::new(prog, Stage::Route);
        }
    }

    fn merge(&mut self, effects: Vec<Effect>, trace: Vec<eval::Trace>) {
        for e in effects {
            let repeat = match &e {
                // A rewrite onto the address already reached says nothing new.
                Effect::RewriteRecipient(a) => self
                    .effects
                    .iter()
                    .rev()
                    .find_map(|x| if let Effect::RewriteRecipient(b) = x { Some(b) } else { None })
                    .is_some_and(|b| b.eq_ignore_ascii_case(a)),
                other => self.effects.contains(other),
            };
            if !repeat {
                self.effects.push(e);
            }
        }
        self.trace.extend(trace);
    }

    fn finish(&mut self, mut v: StageVerdict) -> StageVerdict {
        self.merge(std::mem::take(&mut v.effects), std::mem::take(&mut v.trace));
        v.effects = std::mem::take(&mut self.effects);
        v.trace = std::mem::take(&mut self.trace);
        if self.soft_bounce {
            if let Outcome::Reject(r) = &v.outcome {
                v.outcome = Outcome::Tempfail(eval::soft_bounce(r));
            }
        }
        v
    }
}
