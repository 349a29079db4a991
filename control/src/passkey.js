// kakuremichi: passkeys in control's pages (served as /auth/passkey.js; pages allow only
// same-origin scripts). Uses the browser's WebAuthn JSON helpers.
(function () {
  'use strict';
  function csrf() {
    var i = document.querySelector('input[name=csrf]');
    return i ? i.value : '';
  }
  function say(id, text) {
    var s = document.getElementById(id);
    if (s) s.textContent = text;
  }
  function supported() {
    return window.PublicKeyCredential &&
      typeof PublicKeyCredential.parseCreationOptionsFromJSON === 'function' &&
      typeof PublicKeyCredential.parseRequestOptionsFromJSON === 'function';
  }
  async function post(url, body) {
    var r = await fetch(url, {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'content-type': 'application/json', 'x-csrf-token': csrf() },
      body: JSON.stringify(body),
    });
    var j = await r.json().catch(function () { return {}; });
    if (!r.ok) throw new Error(j.error || ('the server answered ' + r.status));
    return j;
  }

  var add = document.getElementById('add-passkey');
  if (add) {
    add.addEventListener('click', async function () {
      if (!supported()) { say('passkey-status', 'This browser cannot use passkeys here.'); return; }
      try {
        say('passkey-status', 'Follow your browser\u2019s prompt\u2026');
        var o = await post('/auth/passkeys/register/options', {});
        var cred = await navigator.credentials.create({
          publicKey: PublicKeyCredential.parseCreationOptionsFromJSON(o.options.publicKey),
        });
        var name = (document.getElementById('passkey-name') || {}).value || '';
        await post('/auth/passkeys/register', {
          challenge_id: o.challenge_id, name: name, credential: cred.toJSON(),
        });
        say('passkey-status', 'Passkey added.');
      } catch (e) {
        say('passkey-status', 'No passkey was added: ' + e.message);
      }
    });
  }

  var signIn = document.getElementById('passkey-sign-in');
  if (signIn) {
    signIn.addEventListener('click', async function () {
      if (!supported()) { say('passkey-status', 'This browser cannot use passkeys here.'); return; }
      var email = (document.querySelector('input[name=email]') || {}).value || '';
      if (!email) { say('passkey-status', 'Enter your e-mail address first.'); return; }
      try {
        say('passkey-status', 'Follow your browser\u2019s prompt\u2026');
        var o = await post('/auth/passkeys/sign-in/options', { email: email });
        var cred = await navigator.credentials.get({
          publicKey: PublicKeyCredential.parseRequestOptionsFromJSON(o.options.publicKey),
        });
        var f = document.createElement('form');
        f.method = 'post';
        f.action = '/auth/passkeys/sign-in';
        var fields = { challenge_id: o.challenge_id, credential: JSON.stringify(cred.toJSON()), csrf: csrf() };
        ['rd', 'n'].forEach(function (k) {
          var i = document.querySelector('input[name=' + k + ']');
          if (i) fields[k] = i.value;
        });
        Object.keys(fields).forEach(function (k) {
          var i = document.createElement('input');
          i.type = 'hidden'; i.name = k; i.value = fields[k];
          f.appendChild(i);
        });
        document.body.appendChild(f);
        f.submit();
      } catch (e) {
        say('passkey-status', 'Passkey sign-in did not work: ' + e.message);
      }
    });
  }
})();
